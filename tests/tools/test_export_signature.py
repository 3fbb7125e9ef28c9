"""A Tapped takes the model's own export spec (#18 item 4): its forward has the model's signature.

``torch.export.export(tapped, (x,), dynamic_shapes=...)`` accepts what the model itself accepts:
a tuple per argument, or a dict by argument name; dynamic batch and dynamic height/width; and
ONNX with dynamic axes, run by ONNX Runtime at a size other than the example's.
"""

from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxtap


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.body(torch.relu(self.stem(image)))
        return self.head(y.mean((2, 3))) * scale


NAMES = ["stem", "body", "head"]


def _tapped() -> fxtap.Tapped:
    torch.manual_seed(0)
    return fxtap.tap(SmallNet().eval(), NAMES)


def test_tapped_has_the_models_signature_also_after_copy_and_pickle() -> None:
    tapped = _tapped()
    expected = inspect.signature(tapped.model.forward).replace(return_annotation=inspect.Signature.empty)
    assert inspect.signature(tapped.forward) == expected
    buffer = io.BytesIO()
    torch.save(tapped, buffer)
    buffer.seek(0)
    x = torch.randn(1, 3, 16, 16)
    for twin in (copy.deepcopy(tapped), torch.load(buffer, weights_only=False)):
        assert inspect.signature(twin.forward) == expected
        torch.testing.assert_close(twin(x), tapped(x))
        with torch.no_grad():
            twin.model.head.bias.fill_(7.0)  # the twin's forward runs the twin's model
            twin.model.head.weight.zero_()
        assert torch.equal(twin(x)["head"], torch.full((1, 2), 7.0))
        assert not torch.equal(tapped(x)["head"], torch.full((1, 2), 7.0))


BATCH = Dim("batch", min=1, max=64)
SPATIAL = {0: BATCH, 2: Dim("h", min=32, max=512), 3: Dim("w", min=32, max=512)}


@pytest.mark.parametrize(
    ("dynamic_shapes", "size"),
    [
        pytest.param(({0: BATCH},), 224, id="tuple-batch"),
        pytest.param({"image": {0: BATCH}}, 224, id="dict-batch"),
        pytest.param((SPATIAL,), 160, id="tuple-batch-height-width"),
        pytest.param({"image": SPATIAL}, 160, id="dict-batch-height-width"),
    ],
)
def test_torch_export_takes_the_models_dynamic_shapes(dynamic_shapes: object, size: int) -> None:
    tapped = _tapped()
    example = torch.randn(2, 3, 224, 224)
    torch.export.export(tapped.model, (example,), dynamic_shapes=dynamic_shapes)  # the model accepts it
    program = torch.export.export(tapped, (example,), dynamic_shapes=dynamic_shapes).module()
    x = torch.randn(5, 3, size, size)
    got, expected = program(x), tapped(x)
    assert list(got) == NAMES
    for key in NAMES:
        torch.testing.assert_close(got[key], expected[key])


def test_onnx_with_dynamic_axes_runs_at_another_size(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    tapped = _tapped()
    path = tmp_path / "taps.onnx"
    torch.onnx.export(tapped, (torch.randn(2, 3, 224, 224),), str(path), dynamic_shapes=(SPATIAL,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 160, 96)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    expected = tapped(x)
    assert len(outputs) == len(NAMES)
    for got, key in zip(outputs.values(), NAMES):
        torch.testing.assert_close(torch.from_numpy(got), expected[key].detach(), atol=1e-4, rtol=1e-4)
