"""Edits on the torch.export frontend (issue 17): a tensor or module edit of a Hugging Face model
runs in the one exported graph from the second call on; a function edit keeps mixed mode.

The truth is written by hand without fxtap: plain forward hooks on the model that return the
edited value (``edit(output)``, or the patch broadcast to the output), with hook clones of the
tapped module outputs taken in the same forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.registry import CASES
from support.truth import (
    _clone,
    assert_same,
    assert_unchanged,
    model_fingerprint,
    quiet_fallbacks,
)
from torch import nn

import fxtap


class Steer(nn.Module):
    """A module edit: ``value * scale + bias`` (a parameter, and a plain attribute a graph bakes in)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, width))
        self.scale = 0.5

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.scale + self.bias


def _truth(model: nn.Module, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]], taps: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The model's output with each edited module's output replaced by ``edits[path](output)``,
    and clones of the tapped module outputs (after their edit), by plain forward hooks."""
    seen: dict[str, Any] = {}
    handles = []

    def make(path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if path in edits:
                output = edits[path](output)
            if path in taps:
                seen[path] = _clone(output)
            return output

        return hook

    for path in {*edits, *taps}:
        handles.append(model.get_submodule(path).register_forward_hook(make(path)))
    try:
        seen["output"] = _clone(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _patch(tensor: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda value: tensor.expand_as(value).clone()


_SETUPS = {
    # model, module edit (path, width), tensor edit (path, width), tapped names
    "transformers/GPT2Model": (("h.0.mlp", 32), ("h.1.attn.c_proj", 32), ["h.1.mlp", "h.0.mlp"]),
    "transformers/BertModel": (("encoder.layer.0.attention.output.dense", 32), ("encoder.layer.1.intermediate", 64), ["encoder.layer.1.output", "encoder.layer.0"]),
}


def _setup(name: str) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], Steer, torch.Tensor, str, str, list[str]]:
    case = CASES[name]
    model = case.build().eval()
    args, kwargs = case.inputs()
    if name == "transformers/GPT2Model":
        kwargs = {**kwargs, "use_cache": False}
    (steered, width), (patched, patch_width), taps = _SETUPS[name]
    torch.manual_seed(2)
    return model, args, kwargs, Steer(width), torch.randn(patch_width), steered, patched, taps


@pytest.mark.parametrize("name", list(_SETUPS))
def test_export_edit_module_and_tensor_run_in_one_graph(name: str) -> None:
    model, args, kwargs, steer, patch, steered, patched, taps = _setup(name)
    before = model_fingerprint(model)
    edits = {steered: steer, patched: patch}
    with quiet_fallbacks():
        tapped = fxtap.tap(model, taps, edit=edits, keep_output=True)
        edited = fxtap.edit(model, edits)
    with torch.no_grad():
        truth = _truth(model, {steered: steer, patched: _patch(patch)}, taps, *args, **kwargs)
        for wrapped in (tapped, edited):
            wrapped(*args, **kwargs)  # mixed mode, then the export
        out, edited_out = tapped(*args, **kwargs), edited(*args, **kwargs)
    assert tapped.mode == "export", tapped.report()
    assert edited.mode == "export", edited.report()
    assert edited.paths == {steered: "export", patched: "export"}
    assert "one torch.export graph" in edited.report()
    for key in [*taps, "output"]:
        assert_same(out[key], truth[key])
    assert_same(edited_out, truth["output"])
    assert_unchanged(before, model)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if "GPT2" in n else []) for n in _SETUPS])
def test_export_edit_follows_the_edit_after_tap(name: str) -> None:
    model, args, kwargs, steer, patch, steered, patched, taps = _setup(name)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, taps, edit={steered: steer, patched: patch}, keep_output=True)
    with torch.no_grad():
        tapped(*args, **kwargs)
        tapped(*args, **kwargs)
        assert tapped.mode == "export"
        graph = tapped._last_runner()._last  # the exported graph serving this signature
        changes: list[Callable[[], None]] = [
            lambda: patch.mul_(-2.0),  # in place: the graph reads the live tensor
            lambda: steer.bias.add_(1.0),  # a parameter of the module edit, in place
            lambda: setattr(steer, "scale", 3.0),  # a plain attribute a graph bakes in: the guard rebuilds
            lambda: setattr(patch, "data", torch.randn(1, patch.shape[-1])),  # another shape: another graph
        ]
        for change in changes:
            change()
            truth = _truth(model, {steered: steer, patched: _patch(patch)}, taps, *args, **kwargs)
            out = tapped(*args, **kwargs)  # (a rebuilt graph runs mixed once)
            out = tapped(*args, **kwargs)
            assert tapped.mode == "export", tapped.report()
            for key in [*taps, "output"]:
                assert_same(out[key], truth[key])
    assert tapped._last_runner()._last is not graph  # the attribute and the shape were rebuilt for


def test_export_edit_gradients_reach_the_edit_module() -> None:
    model, args, kwargs, steer, patch, steered, patched, _taps = _setup("transformers/GPT2Model")
    with quiet_fallbacks():
        edited = fxtap.edit(model, {steered: steer, patched: patch})
    edited(*args, **kwargs)
    out = edited(*args, **kwargs)
    assert edited.mode == "export"
    out.last_hidden_state.square().sum().backward()
    got = steer.bias.grad.clone()
    steer.bias.grad = None
    model.zero_grad()
    handles = [
        model.get_submodule(steered).register_forward_hook(lambda m, i, o: steer(o)),
        model.get_submodule(patched).register_forward_hook(lambda m, i, o: patch.expand_as(o).clone()),
    ]
    try:
        model(*args, **kwargs).last_hidden_state.square().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, steer.bias.grad, rtol=1e-5, atol=1e-6)


def test_export_function_edit_keeps_mixed_mode_and_says_why() -> None:
    model, args, kwargs, _steer, _patch, steered, _patched, taps = _setup("transformers/GPT2Model")
    factor = {"value": 2.0}  # Python state the function reads: a graph would bake it in
    edits = {steered: lambda v: v * factor["value"]}
    with quiet_fallbacks():
        tapped = fxtap.tap(model, taps, edit=edits)
    with torch.no_grad():
        tapped(*args, **kwargs)
        tapped(*args, **kwargs)
        factor["value"] = -1.0
        out = tapped(*args, **kwargs)
        truth = _truth(model, {steered: lambda v: v * -1.0}, taps, *args, **kwargs)
    assert tapped.mode == "mixed"
    assert "function edit(s) 'h.0.mlp' may read Python state" in tapped.report()
    for key in taps:
        assert_same(out[key], truth[key])


def test_export_function_edit_warning_says_why() -> None:
    model, _args, _kwargs, *_ = _setup("transformers/GPT2Model")
    with pytest.warns(fxtap.FallbackWarning, match=r"function edit\(s\) 'h\.0\.mlp' may read Python state"):
        fxtap.tap(model, ["h.1"], edit={"h.0.mlp": lambda v: v})
