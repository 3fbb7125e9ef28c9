"""Property: the copies an export graph drops were never needed.

Under an eagerly running root, hooks and region graphs copy every value they capture (they cannot
know what runs later); the exported graph can, and returns the value itself where nothing writes
into its storage afterwards and that storage is no input, parameter or buffer
(``prune.drop_copies``). The models here are chains of steps that return their input, a view of
it, their input written in place, or a new tensor, with in-place writes of the root between them,
so that some captured values are overwritten later and some are not. Each module call's value
from the exported graph must equal the eager one (forward hooks that clone), and so must the
model's output and the input the forward wrote into.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.budget import examples
from support.truth import assert_same, hook_truth, quiet_fallbacks
from torch import nn

import fxtap


class _Returns(nn.Module):
    """A user block: its forward is traced on its own under the eager root (a region)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "input":
            return x
        if self.how == "view":
            return x.view(x.shape[0], 2, 2).view(x.shape[0], 4)
        if self.how == "inplace":
            return x.mul_(1.5)
        if self.how == "buffer":
            return self.scale.expand(x.shape[0], 4)  # a view of a buffer
        return x * self.scale + 1


class _Chain(nn.Module):
    """Steps run one after the other; the root writes into the running value between some of
    them (``+= 1``, ``relu_``, ``add_`` under ``torch.no_grad()``, ``add_`` into a piece of
    ``split``, ``mul_`` into each row of a loop over it, ``add_`` into ``x.type_as(x)``) and keeps every step's output in a list it returns. FX cannot trace
    the root (a Python bool of a size); torch.export can."""

    def __init__(self, steps: list[tuple[str, str]]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(_step(kind) for kind, _ in steps)
        self.writes = [write for _, write in steps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[0] == 0:
            return [x]
        outs = []
        for step, write in zip(self.steps, self.writes):
            x = step(x)
            outs.append(x)
            if write == "add_":
                x += 1
            elif write == "relu_":
                x.relu_()
            elif write == "no_grad_add_":  # export records a subgraph call (a higher order op)
                with torch.no_grad():
                    x.add_(1)
            elif write == "split_add_":  # a piece of a list of views: aten.split's schema marks no alias
                x.split(2, dim=1)[0].add_(1)
            elif write == "rows_mul_":  # iterating a tensor: aten.unbind, views again
                for row in x:
                    row.mul_(2)
            elif write == "type_as_add_":  # aten.type_as returns its input: no alias in its schema
                x.type_as(x).add_(1)
            elif write == "new":
                x = x - 0.25
        return [*outs, x]


def _step(kind: str) -> nn.Module:
    if kind == "relu_inplace":
        return nn.ReLU(inplace=True)  # a torch.nn leaf: captured by a hook
    if kind == "linear":
        return nn.Linear(4, 4)
    return _Returns(kind)


_KINDS = ["input", "view", "inplace", "buffer", "new", "relu_inplace", "linear"]
_WRITES = ["none", "add_", "relu_", "no_grad_add_", "split_add_", "rows_mul_", "type_as_add_", "new"]


@settings(max_examples=examples(25), deadline=None, print_blob=True)
@given(steps=st.lists(st.tuples(st.sampled_from(_KINDS), st.sampled_from(_WRITES)), min_size=1, max_size=5))
def test_property_export_drops_only_copies_nothing_overwrites(steps: list[tuple[str, str]]) -> None:
    torch.manual_seed(0)
    model = _Chain(steps).eval()
    x = torch.randn(3, 4)
    names = [f"steps.{i}" for i in range(len(steps))]
    with quiet_fallbacks():
        tapped = fxtap.tap(model, names, keep_output=True)
    twin = copy.deepcopy(model)  # eager truth, two calls as the tapped model gets (a loop over rows may write into a buffer)
    try:
        hook_truth(twin, x.clone())
        truth_x = x.clone()
        truth = hook_truth(twin, truth_x)
    except RuntimeError:  # a write into an expanded buffer view: nothing to compare
        return
    first_x = x.clone()
    tapped(first_x)  # mixed mode, then the export
    given_x = x.clone()
    out: dict[str, Any] = tapped(given_x)
    assert tapped.mode == "export", tapped.report()
    assert_same({name: out[name] for name in names}, {name: truth[name] for name in names})
    assert_same(out["output"], truth["output"])
    assert_same(given_x, truth_x)  # the forward's writes into its input, as eagerly
    assert_same(dict(model.named_buffers()), dict(twin.named_buffers()))
