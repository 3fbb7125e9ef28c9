"""Example 1 of the article "How do I extract output from a specific PyTorch layer?",
done with fxtap, next to the article's own forward-hook recipe.

Run: python examples/seed_example1.py
"""

import torch
import torch.nn as nn

import fxtap

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, kernel_size=3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2, 2),
    nn.Conv2d(16, 32, kernel_size=3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2, 2),
)
input_tensor = torch.randn(1, 3, 32, 32)

# fxtap: name the node ('0' is model[0]) and the key to return it under.
features = fxtap.tap(model, {"0": "conv1"}, detach=True)
conv1_fxtap = features(input_tensor)["conv1"]
print("fxtap       conv1:", conv1_fxtap.shape)

# The article's recipe: a forward hook that stores output.detach().
activation = {}


def get_activation(name):
    def hook(model, input, output):
        activation[name] = output.detach()

    return hook


model[0].register_forward_hook(get_activation("conv1"))
output = model(input_tensor)
conv1_activation = activation["conv1"]
print("hook recipe conv1:", conv1_activation.shape)

print("conv1 values agree:", torch.equal(conv1_fxtap, conv1_activation))
