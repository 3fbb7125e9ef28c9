"""Tap torchvision's resnet18 at a few intermediate points and print what came back.

Run: python examples/resnet18_features.py
"""

import torch
import torchvision

import fxtap

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()

# tap name -> output key: a module ('bn1'), a functional op inside a block
# ('layer1.0.add' is `out += identity`), a whole stage ('layer2'), and the
# second call of a reused module ('layer4.1.relu_1').
features = fxtap.tap(
    model,
    {"bn1": "stem", "layer1.0.add": "residual", "layer2": "c3", "layer4.1.relu_1": "c5"},
)

with torch.no_grad():
    out = features(torch.randn(2, 3, 224, 224))

keys = dict(zip(features.paths, out))
rows = [
    [name, key, tuple(out[key].shape), path]
    for (name, path), key in zip(features.paths.items(), keys.values())
]
print(fxtap._table.table(["name", "key", "shape", "path"], rows))
print(f"mode: {features.mode}")

# Values are taken when the node ran: 'bn1' and 'layer1.0.add' are followed by
# ReLU(inplace=True), yet they keep their negative values.
print(f"bn1 has negatives: {bool((out['stem'] < 0).any())}")
print(f"layer1.0.add has negatives: {bool((out['residual'] < 0).any())}")
