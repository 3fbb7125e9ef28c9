"""Property: on random models that FX traces, the torch.export frontend gives every name the value FX gives it.

The model of ``strategies.cases`` (traceable: no untraceable blocks, no untraceable root) is put
under a root whose own forward FX cannot trace but torch.export can (a Python ``if`` on a size).
Every FX name of the model, asked for through that root (``inner.<name>``), must equal the FX
value after the second call (the exported graph serves it), in train mode too (the RNG seeded
alike before each run), and the model must be unchanged. Fewer examples than the other
properties: each one exports a model.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.strategies import Bag, Case, cases, make_output, output_recipes, seed_rng
from support.toy_models import ExportRoot
from support.truth import (
    assert_same,
    assert_unchanged,
    model_fingerprint,
    quiet_fallbacks,
)
from torch import nn

import fxtap
from fxtap._capture import describe

SEED = 0




@settings(max_examples=15, print_blob=True)
@given(case=cases(), data=st.data())
def test_property_export_values_equal_fx_values(case: Case, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    root = ExportRoot(model)
    with quiet_fallbacks():  # the names both have (a child traced alone fixes None and flags: no ``eq`` of them)
        under_root = {info.name for info in describe(root, train=model.training)}
    common = [i.name for i in describe(model, train=model.training) if i.kind in ("module", "op") and f"inner.{i.name}" in under_root]
    names = data.draw(st.permutations(common), label="names")[: data.draw(st.integers(1, 8), label="count")]
    seed_rng(SEED)
    by_fx = fxtap.tap(model, names, mode="fx")(*args, **kwargs)
    with quiet_fallbacks():
        tapped = fxtap.tap(root, [f"inner.{name}" for name in names])
    seed_rng(SEED)
    tapped(*args, **kwargs)  # mixed mode, then the export
    before = model_fingerprint(model)
    seed_rng(SEED)
    exported = tapped(*args, **kwargs)
    assert tapped.mode == "export", tapped.report()
    assert_same(exported, {f"inner.{name}": value for name, value in by_fx.items()})
    if not model.training:  # a train-mode call updates batch-norm statistics, as the eager one does
        assert_unchanged(before, model)
    assert torch.is_grad_enabled()


class _Makes(nn.Module):
    """Makes a new value of ``recipe`` each call; returns it once, or twice (one object, twice)."""

    def __init__(self, recipe: Any, twice: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.recipe, self.twice = recipe, twice

    def forward(self, x: torch.Tensor) -> Any:
        value = make_output(self.recipe, self.fc(x))
        return (value, value) if self.twice else value


def _assert_like(actual: Any, expected: Any, pairs: dict[int, Any]) -> None:
    """Equal values, the same types, and the same objects where eager has one object twice."""
    if isinstance(expected, torch.Tensor):
        assert_same(actual, expected)
    elif isinstance(expected, Bag):
        assert type(actual) is Bag
        if id(expected) in pairs:
            assert pairs[id(expected)] is actual  # one object, as eagerly
            return
        pairs[id(expected)] = actual
        assert list(vars(actual)) == list(vars(expected))
        for key, value in vars(expected).items():
            _assert_like(getattr(actual, key), value, pairs)
    elif isinstance(expected, (list, tuple, dict)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        if isinstance(expected, dict):
            assert list(actual) == list(expected)
            actual, expected = list(actual.values()), list(expected.values())
        for a, e in zip(actual, expected, strict=True):
            _assert_like(a, e, pairs)
    else:
        assert type(actual) is type(expected) and actual == expected


def _bags(value: Any) -> set[int]:
    if isinstance(value, Bag):
        return {id(value)} | {i for v in vars(value).values() for i in _bags(v)}
    if isinstance(value, (list, tuple)):
        return {i for v in value for i in _bags(v)}
    if isinstance(value, dict):
        return {i for v in value.values() for i in _bags(v)}
    return set()


@settings(max_examples=20, print_blob=True)
@given(recipe=output_recipes(), twice=st.booleans())
def test_property_export_returns_what_the_forward_makes(recipe: Any, twice: bool) -> None:
    """Objects that the forward makes and returns (a transformers cache is one) come back from the
    exported graph equal to eager's, new on every call, one object wherever eager has one."""
    torch.manual_seed(0)
    model = ExportRoot(_Makes(recipe, twice))
    x = torch.randn(2, 3)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["inner"], keep_output=True)
    first = tapped(x)  # mixed mode, then the export
    second = tapped(x)
    assert tapped.mode == "export", tapped.report()
    with torch.no_grad():
        truth = model(x)
    for out in (first, second):
        _assert_like(out["output"], truth, {})
        _assert_like(out["inner"], truth, {})
    assert not _bags(first["output"]) & _bags(second["output"])  # nothing of one call's objects in the next's
