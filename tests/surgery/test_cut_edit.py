"""``fxtap.cut(..., edit=)``: cut and edit compose (#15). The truth is the eager model with the
edit applied by a plain forward hook (a module's output) or by ``fxtap.edit`` (a functional op,
itself checked against eager in tests/properties/test_edit_properties.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torchvision
from torch import nn

import fxtap


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@contextmanager
def _hooked(model: nn.Module, path: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    handle = model.get_submodule(path).register_forward_hook(lambda module, args, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def _half(value: torch.Tensor) -> torch.Tensor:
    return value * 0.5 - 0.1


@pytest.mark.parametrize("path", ["layer4.0.conv1", "layer4.0.downsample", "layer4", "layer3"])  # "layer3": the cut input itself
def test_cut_with_a_function_edit_equals_the_eagerly_edited_model(path: str) -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        given = fxtap.tap(model, ["layer3"])(x)["layer3"]  # the model's own value: an edit of "layer3" applies to it
        with _hooked(model, path, _half):
            expected = model(x)
        head = fxtap.cut(model, ["layer3"], edit={path: _half})
        assert torch.equal(head(given)["output"], expected)


def test_cut_output_of_an_edited_name_is_the_value_after_the_edit() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        given = fxtap.tap(model, ["layer3"])(x)["layer3"]
        expected = fxtap.tap(model, ["layer4.0", "layer4.1.add"], edit={"layer4.0": _half, "layer4.1.add": torch.zeros_like}, keep_output=True)(x)
        head = fxtap.cut(model, ["layer3"], ["layer4.0", "layer4.1.add", "output"], edit={"layer4.0": _half, "layer4.1.add": torch.zeros_like})
        got = head(given)
    for key in ("layer4.0", "layer4.1.add", "output"):
        assert torch.equal(got[key], expected[key])
    assert not got["layer4.1.add"].any()


def test_cut_with_a_tensor_edit_never_writes_into_it() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    patch = torch.randn(2, 512, 1, 1)
    kept = patch.clone()
    with torch.no_grad():
        given = fxtap.tap(model, ["layer3"])(x)["layer3"]
        with _hooked(model, "layer4.0.bn1", lambda out: kept.expand_as(out).clone()):
            expected = model(x)
        head = fxtap.cut(model, ["layer3"], edit={"layer4.0.bn1": patch})  # the ReLU after it runs in place
        assert torch.equal(head(given)["output"], expected)
    assert torch.equal(patch, kept)


def test_cut_edit_module_trains_with_the_cut() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    gate = nn.Conv2d(512, 512, 1)
    head = fxtap.cut(model, ["layer3"], edit={"layer4": gate})
    assert {id(p) for p in gate.parameters()} <= {id(p) for p in head.parameters()}
    given = fxtap.tap(model, ["layer3"], detach=True)(x)["layer3"]
    head(given)["output"].sum().backward()
    cut_grads = [p.grad.clone() for p in gate.parameters()]  # type: ignore[union-attr]
    gate.zero_grad()
    model.zero_grad()
    with _hooked(model, "layer4", gate):
        model(x).sum().backward()
    for got, expected in zip(cut_grads, [p.grad for p in gate.parameters()], strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("path", ["layer2.0.conv1", "layer3.1.conv1"])  # before the cut, and inside the module that returns its input
def test_cut_edit_of_a_value_before_the_cut_is_an_error(path: str) -> None:
    model = _resnet18()
    with pytest.raises(fxtap.CutError, match=rf"cannot edit '{path}'.*computed before the cut(.|\n)*fxtap.tap\(model, \['layer3'\], edit="):
        fxtap.cut(model, ["layer3"], edit={path: _half})


def test_cut_edit_of_an_unknown_name_is_a_name_error() -> None:
    with pytest.raises(fxtap.TapNameError, match="layer9"):
        fxtap.cut(_resnet18(), ["layer3"], edit={"layer9": _half})

