"""Property: tensor and module edits on the torch.export frontend equal the eager truth.

A random traceable model (``strategies.cases``) runs under a root torch.fx cannot trace and
torch.export can (a Python bool of a size), so ``tap(..., edit=)`` takes the export frontend: the
first call runs in mixed mode and exports, later calls run the exported graph with the edits in
it. Random tensor and module edits (on module outputs and functional ops); the taps of every
call, and the gradients of the edit modules' parameters, equal ``strategies.edited_truth`` (no
fxtap: forward hooks and the model's own code applying each edit). Then each tensor edit is
changed in place and each module edit's parameters too: the next call (the same graph) follows.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.strategies import Case, case_truth, cases, edited_truth, seed_rng
from support.toy_models import ExportRoot
from support.truth import assert_same
from test_edit_properties import _draw_edits, _truth_fn
from torch import nn

import fxtap

SEED = 0
EXAMPLES = settings.default.max_examples if settings.default.max_examples > 200 else 12  # each example exports once




def _graph_edits(edits: dict[str, Any]) -> dict[str, Any]:
    """The drawn edits a graph may hold: tensors and modules (a function keeps mixed mode)."""
    return {name: edit for name, edit in edits.items() if isinstance(edit, (torch.Tensor, nn.Module))}


def _check(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], edits: dict[str, Any], taps: list[str]) -> fxtap.Tapped:
    _expected, values = edited_truth(model, args, kwargs, {n: _truth_fn(e) for n, e in edits.items()}, seed=SEED)
    root = ExportRoot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(root, [f"inner.{n}" for n in taps], edit={f"inner.{n}": e for n, e in edits.items()})
    for _ in range(2):  # mixed mode and the export, then the exported graph
        seed_rng(SEED)
        got = tapped(*args, **kwargs)
        for name in taps:
            assert_same(got[f"inner.{name}"], values[name], exact=False)
    return tapped


@settings(max_examples=EXAMPLES)
@given(cases(train=False), st.data())
def test_export_edits_match_truth_and_follow_in_place_changes(case: Case, data: st.DataObject) -> None:
    case = dataclasses.replace(case, train=False)
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs, seed=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        # under an eager root, names are known for the default arguments (a ``scale=`` op is not)
        known = set(fxtap.names(ExportRoot(model)))
    names = [n for n in truth.order if f"inner.{n}" in known and isinstance(truth.values.get(n), torch.Tensor)]
    edits = _graph_edits(_draw_edits(data, names, truth.values, "edits")) if names else {}
    if not edits:
        return
    taps = data.draw(st.permutations(names), label="taps")[:3]
    tapped = _check(model, args, kwargs, edits, taps)
    if tapped.mode != "export":  # torch.export refused this model (report() says why): mixed mode was checked
        assert "torch.export" in tapped.report()
        return
    runner = tapped._last_runner()
    graph = runner.last
    with torch.no_grad():
        for edit in edits.values():
            if isinstance(edit, torch.Tensor):
                edit.mul_(-1.5).add_(0.25)
            else:
                for parameter in edit.parameters():
                    parameter.add_(0.125)
    _check_again = edited_truth(model, args, kwargs, {n: _truth_fn(e) for n, e in edits.items()}, seed=SEED)[1]
    seed_rng(SEED)
    got = tapped(*args, **kwargs)
    assert tapped.mode == "export" and runner.last is graph  # the same graph, reading the live tensors
    for name in taps:
        assert_same(got[f"inner.{name}"], _check_again[name], exact=False)
