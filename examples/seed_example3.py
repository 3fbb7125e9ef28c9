"""Example 3 of the article "How do I extract output from a specific PyTorch layer?"
(layers of a custom model, by name), done with fxtap, next to the article's hook recipe.

Run: python examples/seed_example3.py
"""

import torch
import torch.nn as nn

import fxtap


class MyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 16 * 16, 10)  # assuming a 32x32 input image

    def forward(self, x):
        x = self.conv1(x)
        x = self.relu1(x)
        x = self.pool1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        return x


torch.manual_seed(0)
model = MyModel()
input_tensor = torch.randn(1, 3, 32, 32)
layer_names = ["conv1", "fc1"]

# fxtap: module names are tap names; functional ops are tappable too ('flatten').
tapped = fxtap.tap(model, layer_names + ["flatten"], detach=True)(input_tensor)
for name in layer_names + ["flatten"]:
    print(f"fxtap       {name}:", tapped[name].shape)

# The article's recipe: look modules up by name, register a lambda hook on each.
activations = {}
for layer_name in layer_names:
    layer = model._modules[layer_name]
    layer.register_forward_hook(
        lambda model, input, output, name=layer_name: activations.update({name: output.detach()})
    )
output = model(input_tensor)
for name in layer_names:
    print(f"hook recipe {name}:", activations[name].shape)

for name in layer_names:
    print(f"{name} values agree:", torch.equal(tapped[name], activations[name]))
