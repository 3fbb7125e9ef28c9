"""Example 2 of the article "How do I extract output from a specific PyTorch layer?"
(outputs of several layers), done with fxtap, next to the article's hook recipe.

Run: python examples/seed_example2.py
"""

import torch
import torch.nn as nn

import fxtap

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(10, 64),
    nn.ReLU(),
    nn.Linear(64, 128),
    nn.ReLU(),
    nn.Linear(128, 10),
)
input_tensor = torch.randn(1, 10)

# fxtap: one call returns both layers; model[4] is pruned away (never runs).
features = fxtap.tap(model, {"0": "layer1", "2": "layer3"}, detach=True)
tapped = features(input_tensor)
for key in ("layer1", "layer3"):
    print(f"fxtap       {key}:", tapped[key].shape)

# The article's recipe: one hook per layer, filling a dict.
activations = {}


def hook_fn(name):
    def hook(module, input, output):
        activations[name] = output.detach()

    return hook


model[0].register_forward_hook(hook_fn("layer1"))
model[2].register_forward_hook(hook_fn("layer3"))
output = model(input_tensor)
for key in ("layer1", "layer3"):
    print(f"hook recipe {key}:", activations[key].shape)

for key in ("layer1", "layer3"):
    print(f"{key} values agree:", torch.equal(tapped[key], activations[key]))
