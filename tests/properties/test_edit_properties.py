"""Property tests of ``fxtap.edit`` and ``tap(..., edit=)`` on random models.

For a random set of edits (functions, tensors, modules; on module outputs and functional ops;
several at once, so some edit lies upstream of another, and some value is later mutated in
place), the FX path, the hook path (module names only) and an eager truth computed without
fxtap (``strategies.edited_truth``: forward hooks returning the replacement, and the model's own
code applying the edit in the op's line) agree: outputs, taps, and gradients of the model's
parameters and of the edit modules' parameters. A tensor handed in as an edit is never written.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtap
from support.strategies import W, Case, case_truth, cases, edited_truth, seed_rng
from support.truth import assert_same, assert_unchanged, model_fingerprint

SEED = 0
# each example runs the model five times and builds three graphs: the default suite draws 50 per
# property; the "thorough" profile draws its own count (HYPOTHESIS_PROFILE=thorough)
EXAMPLES = settings.default.max_examples if settings.default.max_examples > 200 else 50


class Scale(nn.Module):
    """A small trainable edit for values of any shape."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.75))
        self.shift = nn.Parameter(torch.tensor(0.25))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.gain + self.shift


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a module may return one (Pair's "dataclass")
        return dataclasses.replace(value, **{f.name: _map(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init})
    return {k: _map(v, fn) for k, v in value.items()}


class _Affine:
    """A callable edit (a plain object, so hypothesis prints it)."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def __call__(self, value: Any) -> Any:
        return _map(value, lambda t: t * self.a + self.b)

    def __repr__(self) -> str:
        return f"_Affine({self.a}, {self.b})"


@st.composite
def edit_for(draw: st.DrawFn, value: Any) -> tuple[str, Any]:
    """An edit for a value like ``value``: ("fn" | "tensor" | "module", the edit)."""
    kinds = ["fn"] + (["tensor", "module"] if isinstance(value, torch.Tensor) and value.is_floating_point() else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "fn":
        return kind, _Affine(draw(st.sampled_from((0.0, 0.5, -1.0, 2.0))), draw(st.sampled_from((0.0, 1.0, -0.5))))
    seed_rng(draw(st.integers(0, 1000)))
    if kind == "tensor":
        broadcast = value.shape[-1:] if draw(st.booleans()) else value.shape
        return kind, torch.randn(broadcast)
    return kind, nn.Linear(W, W) if value.dim() == 2 and value.shape[-1] == W and draw(st.booleans()) else Scale()


def _truth_fn(edit: Any) -> Any:
    """The same edit for the eager truth: a tensor edit replaces the value by a fresh copy."""
    if isinstance(edit, torch.Tensor):
        return lambda value: torch.broadcast_to(edit, torch.broadcast_shapes(edit.shape, value.shape)).clone()
    return edit


def _draw_edits(data: st.DataObject, names: list[str], values: dict[str, Any], label: str) -> dict[str, Any]:
    count = data.draw(st.integers(1, min(3, len(names))), label=f"number of {label}")
    chosen = data.draw(st.permutations(names), label=label)[:count]
    return {name: data.draw(edit_for(values[name]), label=f"edit of {name}")[1] for name in chosen}


def _grads(modules: list[nn.Module], output: Any) -> list[torch.Tensor | None]:
    for module in modules:
        module.zero_grad(set_to_none=True)
    leaves = [t for t in _leaves(output) if t.requires_grad]
    if leaves:
        sum(t.sum() for t in leaves).backward()
    return [p.grad for module in modules for p in module.parameters()]


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _leaves(getattr(value, f.name))]
    return []


def _assert_grads(actual: list[torch.Tensor | None], expected: list[torch.Tensor | None]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None or not a.any()
            continue
        assert a is not None
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * (1 + float(e.abs().max())))


def _edited(model: nn.Module, edits: dict[str, Any], **options: Any) -> fxtap.Edited:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.edit(model, edits, **options)


def _check(case: Case, data: st.DataObject, *, hooks_too: bool) -> None:
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs, seed=SEED)
    names = [n for n in truth.names if n in truth.values]
    edits = _draw_edits(data, names, truth.values, "edits")
    given_tensors = {n: e.clone() for n, e in edits.items() if isinstance(e, torch.Tensor)}
    edit_modules = [e for e in edits.values() if isinstance(e, nn.Module)]
    truth_edits = {n: _truth_fn(e) for n, e in edits.items()}
    expected, expected_values = edited_truth(model, args, kwargs, truth_edits, seed=SEED)
    expected_grads = _grads([model, *edit_modules], expected)

    before = model_fingerprint(model)
    edited = _edited(model, edits)
    if any(name not in expected_values for name in edits):  # the edits sent untraceable code down another branch
        seed_rng(SEED)
        with pytest.raises(fxtap.MissingCallError, match="found no call to edit"):
            edited(*args, **kwargs)  # an edit that cannot apply is an error, as a tap would be
        return
    seed_rng(SEED)
    output = edited(*args, **kwargs)
    assert_same(output, _detached(expected))
    _assert_grads(_grads([model, *edit_modules], output), expected_grads)
    if not case.train:  # in train mode batch norm's statistics move with each run
        assert_unchanged(before, model)
    for name, tensor in given_tensors.items():
        torch.testing.assert_close(edits[name], tensor, rtol=0, atol=0)  # a tensor handed in is never written
    assert set(edited.paths) == set(edits)

    ran = [n for n in names if n in expected_values]  # an edit may change which branch untraceable code takes
    taps = data.draw(st.permutations(ran), label="taps")[:3]
    tapped = fxtap.tap(model, taps, edit=edits) if not case.untraceable else _tap_quiet(model, taps, edits)
    seed_rng(SEED)
    got = tapped(*args, **kwargs)
    for name in taps:
        assert_same(got[name], expected_values[name])

    module_edits = {n: e for n, e in edits.items() if n in truth.modules}
    if hooks_too and module_edits:
        expected_h, _ = edited_truth(model, args, kwargs, {n: _truth_fn(e) for n, e in module_edits.items()}, seed=SEED)
        mods = [e for e in module_edits.values() if isinstance(e, nn.Module)]
        grads_h = _grads([model, *mods], expected_h)
        by_hooks = fxtap.edit(model, module_edits, mode="hooks")
        seed_rng(SEED)
        out_h = by_hooks(*args, **kwargs)
        assert_same(out_h, _detached(expected_h))
        _assert_grads(_grads([model, *mods], out_h), grads_h)
        assert set(by_hooks.paths.values()) == {"hook"}


def _tap_quiet(model: nn.Module, taps: list[str], edits: dict[str, Any]) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, taps, edit=edits)


def _detached(value: Any) -> Any:
    return _map(value, torch.Tensor.detach) if not isinstance(value, torch.Tensor) else value.detach()


@settings(max_examples=EXAMPLES)
@given(cases(), st.data())
def test_edit_fx_matches_hooks_and_truth(case: Case, data: st.DataObject) -> None:
    _check(case, data, hooks_too=True)


@settings(max_examples=EXAMPLES)
@given(cases(untraceable=True), st.data())
def test_edit_untraceable_matches_truth(case: Case, data: st.DataObject) -> None:
    _check(case, data, hooks_too=False)
