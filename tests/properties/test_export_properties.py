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
from torch import nn

import fxtap
from fxtap._capture import describe
from support.strategies import Case, cases, seed_rng
from support.truth import assert_same, assert_unchanged, model_fingerprint, quiet_fallbacks

SEED = 0


class EagerRoot(nn.Module):
    """``inner`` under a root FX cannot trace (a Python bool of a size) and torch.export can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args[0].shape[0] > 0:
            return self.inner(*args, **kwargs)
        return args[0]


@settings(max_examples=15, print_blob=True)
@given(case=cases(), data=st.data())
def test_property_export_values_equal_fx_values(case: Case, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    root = EagerRoot(model)
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
