"""A feature pyramid on a tapped resnet18: fxtap.backbone's feature_info sizes the FPN.

Run: python examples/fpn_backbone.py
"""

import tempfile
from pathlib import Path

import onnxruntime
import torch
import torchvision
from torch import nn

import fxtap

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
stages = {"layer1": "p2", "layer2": "p3", "layer3": "p4", "layer4": "p5"}

# The example input is run once (eval mode, no gradients) to measure each output.
body = fxtap.backbone(model, stages, torch.randn(1, 3, 64, 64))
for info in body.feature_info:
    print(f"{info.key}: {info.name}, {info.channels} channels, reduction {info.reduction}")

fpn = torchvision.ops.FeaturePyramidNetwork([info.channels for info in body.feature_info], out_channels=64).eval()
detector = nn.Sequential(body, fpn)  # the dict of taps goes straight into the FPN

x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    pyramid = detector(x)
for info, (key, level) in zip(body.feature_info, pyramid.items()):
    print(key, tuple(level.shape), info.reduction)

# The backbone plus FPN is one graph for torch.export (avgpool and fc are never traced).
program = torch.export.export(detector, (x,))
with torch.no_grad():
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(program.module()(x).values(), pyramid.values()))
print(f"torch.export matches eager: {same}")

# fxtap.export writes the taps alone, checked against eager; ONNX outputs carry the keys.
with tempfile.TemporaryDirectory() as folder:
    path = fxtap.export(model, stages, torch.randn(1, 3, 64, 64), Path(folder) / "backbone.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print(f"onnx outputs: {[o.name for o in session.get_outputs()]}")
