"""fxtap.compare: rows, tolerance, the table, state left as it was, and a property on random models."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtap
from fxtap import _compare
from support.budget import examples
from support.strategies import Case, case_truth, cases, seed_rng
from support.toy_models import DataDependent, InplaceZoo, MultiIO, Shared
from support.truth import assert_unchanged, model_fingerprint, quiet_fallbacks


def test_compare_inplace_model_rows() -> None:
    torch.manual_seed(0)
    result = fxtap.compare(InplaceZoo(), ["fc1", "act", "add", "x"], torch.randn(8, 4))
    assert result.ok
    assert [row.name for row in result.rows] == ["fc1", "act", "add", "x"]
    fc1, act, add, x = result.rows
    assert (fc1.fx, fc1.hooks, fc1.fx_vs_hooks, fc1.vs_truth) == (True, True, 0.0, 0.0)
    assert (add.fx, add.hooks, add.fx_vs_hooks, add.vs_truth) == (True, False, None, 0.0)  # op: truth from the full graph
    assert (fc1.shape, fc1.dtype) == ((8, 4), "float32")
    assert result["act"] is act and x.shape == (8, 4)


def test_compare_str_is_a_table_with_a_summary() -> None:
    text = str(fxtap.compare(Shared(), ["blk", "blk_1", "ln_2"], torch.randn(2, 4)))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "paths", "fx", "vs", "hooks", "vs", "truth", "ok"]
    assert lines[2].split()[:5] == ["blk", "(2,", "4)", "float32", "fx,"]
    assert lines[-1] == "3 of 3 names agree within rtol=1.3e-06, atol=1e-05"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and random.random() < 0.5:  # Python's RNG: the trace keeps one outcome
            return x
        return x + self.fc(x)


def test_compare_flags_a_trace_that_differs_from_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2)).train()
    random.seed(10)  # the trace draws 0.57 (keeps fc), every run then draws 0.43 (skips it)
    result = fxtap.compare(model, ["0", "1"], torch.randn(2, 4))
    assert not result.ok
    assert not result["0"].ok and result["0"].fx_vs_hooks == result["0"].vs_truth > 0.1
    assert "MISMATCH" in str(result) and str(result).endswith("0 of 2 names agree within rtol=1.3e-06, atol=1e-05")


def test_compare_tolerance_decides() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2)).train()
    random.seed(10)
    assert fxtap.compare(model, ["1"], torch.randn(2, 4), rtol=0, atol=10.0).ok


def test_compare_untraceable_submodule_paths() -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(3, 4)
    branch = "gate.a" if model.pre(x).sum() > 0 else "gate.b"
    result = fxtap.compare(model, ["pre", "gate", branch, "post"], x)
    assert result.ok
    assert [(row.fx, row.hooks) for row in result.rows] == [(True, True), (True, True), (False, True), (True, True)]
    assert result[branch].fx_vs_hooks is None and result[branch].vs_truth == 0.0


def test_compare_call_that_did_not_happen() -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(3, 4)
    other = "gate.b" if model.pre(x).sum() > 0 else "gate.a"
    with pytest.raises(fxtap.MissingCallError, match=f"no path produced '{other}'"):
        fxtap.compare(model, ["pre", other], x)


def test_compare_unknown_name() -> None:
    with pytest.raises(fxtap.TapNameError, match="no tap named 'fc9'"):
        fxtap.compare(InplaceZoo(), ["fc9"], torch.randn(1, 4))


def test_compare_tuple_values_and_keyword_inputs() -> None:
    torch.manual_seed(0)
    x, y, bias = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4)
    result = fxtap.compare(MultiIO(), ["split", "fc", "mul"], x, y, scale=3.0, bias=bias)
    assert result.ok
    assert result["split"].shape == ((2, 4), (2, 4)) and result["split"].dtype == "float32"
    assert result["mul"].vs_truth == 0.0


def test_compare_leaves_model_and_rng_as_they_were() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 4)).train()
    before, x = model_fingerprint(model), torch.randn(8, 4)
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    result = fxtap.compare(model, ["1", "2", "3"], x)
    assert result.ok  # every path draws the same dropout mask
    assert_unchanged(before, model)  # batch norm statistics restored
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state


def test_compare_input_written_in_place_is_fresh_for_every_run() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return self.fc(x)

    x = torch.ones(1, 2)
    assert fxtap.compare(Scale(), ["fc", "mul_"], x).ok
    assert torch.equal(x, torch.ones(1, 2))


def test_compare_max_diff_and_close_fail_on_a_perturbed_value() -> None:  # meta-test of the helpers
    a = torch.randn(3)
    assert _compare._max_diff(a, a.clone()) == 0.0 and _compare._close(a, a.clone(), 0, 0)
    assert _compare._max_diff(a, a + 1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert not _compare._close(a, a + 1e-3, 0, 1e-4)
    assert _compare._max_diff((a, a), [a, a]) == float("inf")  # structures differ
    assert not _compare._close(a, a.double(), 1, 1)  # dtypes differ
    assert _compare._max_diff(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0.0


@settings(max_examples=examples(30))
@given(case=cases(untraceable=True), data=st.data())
def test_property_compare_is_ok_on_random_models(case: Case, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs)
    names = truth.names
    chosen = data.draw(st.permutations(names), label="names")[: data.draw(st.integers(1, min(5, len(names))))]
    before = model_fingerprint(model)
    seed_rng(0)  # the RNG state case_truth ran from: the same dropout masks, so the same branches
    result = fxtap.compare(model, chosen, *args, **kwargs)
    assert result.ok, str(result)
    assert all(row.vs_truth == 0.0 for row in result.rows if row.hooks or not case.root_untraceable)
    assert_unchanged(before, model)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, chosen)
        tapped(*args, **kwargs)  # paths describe the last call: a name may need this call's arguments
    paths = tapped.paths
    assert [(row.name, row.fx, row.hooks) for row in result.rows] == [
        (name, paths[name] == "fx", name in truth.modules) for name in chosen
    ]
