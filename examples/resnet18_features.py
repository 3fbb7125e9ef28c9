"""Tap torchvision's resnet18 at a few intermediate points and print what came back.

Run: python examples/resnet18_features.py
"""

import torch
import torchvision
from tabulate import tabulate

import fxtap

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()

# tap name -> output key: a module ('bn1'), a functional op inside a block
# ('layer1.0.add' is `out += identity`), a whole stage ('layer2'), and the
# second call of a reused module ('layer4.1.relu_1').
request = {"bn1": "stem", "layer1.0.add": "residual", "layer2": "c3", "layer4.1.relu_1": "c5"}
features = fxtap.tap(model, request)

with torch.no_grad():
    out = features(torch.randn(2, 3, 224, 224))

rows = [[name, key, tuple(out[key].shape), features.paths[name]] for name, key in request.items()]
print(tabulate(rows, headers=["name", "key", "shape", "path"]))
print(f"mode: {features.mode}")

# Values are taken when the node ran: 'bn1' and 'layer1.0.add' are followed by
# ReLU(inplace=True), yet they keep their negative values.
print(f"bn1 has negatives: {bool((out['stem'] < 0).any())}")
print(f"layer1.0.add has negatives: {bool((out['residual'] < 0).any())}")
