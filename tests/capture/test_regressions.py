"""Plain regression tests: counterexamples found by the property tests (tests/test_properties.py).

Each is the smallest model found for one bug; each failed before its fix in fxtap. A bug not
fixed yet is marked ``xfail(strict=True)``: the fix makes it pass, strict xfail then fails, and
the mark goes (with any matching exclusion in tests/strategies.py or tests/test_properties.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxtap
from support.truth import assert_same, hook_truth, quiet_fallbacks


class Gate(nn.Module):
    """Branches on a tensor's value: torch.fx cannot trace it, so mode="auto" makes it a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(Gate())  # body's output is the opaque leaf's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 2


def test_hooked_name_in_a_leaf_that_a_container_returns() -> None:
    # _plan.Analysis.hookable_under() lists every module point whose value is a call_module node,
    # so "body" (whose output *is* the node of body.0) counts as a leaf. assign() then runs
    # hooked names under the outermost such "leaf", "body", which is no call_module target:
    # the graph keeps nothing and body.0 never runs (MissingCallError).
    torch.manual_seed(0)
    model = Wrapped()
    x = torch.randn(3, 2)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["body.0.a"])
    assert tapped.paths == {"body.0.a": "hook"}
    assert_same(tapped(x)["body.0.a"], hook_truth(model, x)["body.0.a"])


class OptionalInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            x = x + self.fc(y)
        return x


def test_name_that_exists_only_with_an_optional_argument() -> None:
    # Tapped.__init__ builds the runner of the default arguments (y=None) to check the names,
    # and "fc" is not called there: TapNameError, although model(x, y) calls fc, the Tapped
    # builds a graph per argument spec, and mode="hooks" accepts the name.
    torch.manual_seed(0)
    model = OptionalInput()
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    out = fxtap.tap(model, ["fc", "add"])(x, y)
    assert_same(out["fc"], hook_truth(model, x, y)["fc"])
    assert_same(out["add"], (x + model.fc(y)).detach())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


class Twice(nn.Module):
    """An untraceable root that calls one traceable child twice."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the root's own code cannot be traced
            x = -x
        return self.blk(self.blk(x))


def test_second_call_of_a_child_traced_under_an_eager_root() -> None:
    # Local tracing used to serve only the first call of blk: blk.add_1 (the add of the second
    # call) raised TapNameError, and blk_1 and blk.fc_1 went to hooks although blk's code traces
    # (docs/fallback.md: only names in untraceable code itself go to hooks).
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(3, 2)
    truth = hook_truth(model, x)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["blk.fc_1", "blk_1", "blk.add_1"])
    assert tapped.paths == {"blk.fc_1": "fx", "blk_1": "fx", "blk.add_1": "fx"}
    out = tapped(x)
    assert_same(out["blk.fc_1"], truth["blk.fc_1"])
    assert_same(out["blk.add_1"], truth["blk_1"])  # blk returns its add
    assert_same(out["blk_1"], truth["blk_1"])
    with quiet_fallbacks():
        first = fxtap.tap(model, ["blk.add", "blk"])(x)  # the first call keeps the bare names
    assert_same(first["blk.add"], truth["blk"])


def test_call_of_a_locally_traced_child_that_does_not_happen() -> None:
    model = Twice()
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["blk.add_2"])
    with pytest.raises(fxtap.MissingCallError, match="'blk.add_2' .from 'blk', which ran 2 time"):
        tapped(torch.randn(3, 2))


class OptionalInputAndScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        if y is not None:
            x = x + self.fc(y)
        if scale != 1.0:  # a Python branch on a non-tensor argument
            x = x * scale
        return x


def test_name_that_exists_only_with_an_optional_argument_beside_a_python_flag() -> None:
    # The default arguments (y=None) do not call fc, so tap() checks the names again with every
    # argument a graph input; then `scale != 1.0` is a branch on a Proxy and the root does not
    # trace: mode="auto" rejects "add" (TapNameError) and hooks "fc" with a FallbackWarning,
    # mode="fx" rejects both, although model(x, y) with scale=1.0 traces (y a tensor, scale fixed).
    torch.manual_seed(0)
    model = OptionalInputAndScale()
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    tapped = fxtap.tap(model, ["fc", "add"], mode="fx")
    out = tapped(x, y)
    assert_same(out["fc"], hook_truth(model, x, y)["fc"])
    assert_same(out["add"], (x + model.fc(y)).detach())


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.fc(x)
        if scale != 1.0:  # "mul" exists only when scale is passed
            x = x * scale
        return x


def test_name_that_exists_only_with_a_non_default_flag() -> None:
    # tap() checked names with every non-tensor default fixed (scale=1.0), where "mul" does not
    # exist, and raised TapNameError, although the Tapped builds a graph per non-tensor argument
    # value when called. Now such names are checked per call when the graph depends on them.
    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(3, 2)
    tapped = fxtap.tap(model, ["mul"])
    out = tapped(x, scale=2.0)
    assert_same(out["mul"], (model.fc(x) * 2.0).detach())
    assert tapped.paths == {"mul": "fx"}  # paths, mode and report() describe the last call
    assert tapped.mode == "fx"


def test_unknown_name_of_a_flag_dependent_model_is_reported_at_the_call() -> None:
    model = Scaled()
    tapped = fxtap.tap(model, ["mull"])  # may exist for some scale: checked when called
    with pytest.raises(fxtap.TapNameError, match=r"(?s)'mull'.*'mul'.*scale=2\.0"):
        tapped(torch.randn(3, 2), scale=2.0)
    with pytest.raises(fxtap.TapNameError, match="scale=1.0"):
        tapped(torch.randn(3, 2))


def test_unknown_name_of_a_model_whose_graph_ignores_its_flags_is_rejected_by_tap() -> None:
    class Flagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.fc(x) * scale  # no branch on scale: every value gives the same names

    with pytest.raises(fxtap.TapNameError, match="Did you mean: 'mul'"):
        fxtap.tap(Flagged(), ["mull"])


class RandomGate(nn.Module):
    """Untraceable (a branch on a value) and random: an opaque leaf that draws from the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.drop(x)
        return self.drop(-x)


class DropThenGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.gate = RandomGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) + self.gate(x)


def test_random_op_before_an_opaque_leaf_that_draws_is_kept() -> None:
    # Tapping gate.drop needs only the gate, so pruning dropped the root's dropout before it; but
    # the gate's own dropout then drew from another RNG state than in the eager forward. Pruning
    # treated only Dropout modules as drawing from the RNG, not opaque leaves (which may call anything).
    model = DropThenGate().train()
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    truth = hook_truth(model, x)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["gate.drop"])
    torch.manual_seed(0)
    assert_same(tapped(x)["gate.drop"], truth["gate.drop"])


class _EagerRootInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


class _EagerRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _EagerRootInner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the root runs eagerly; 'a' is traced on its own
            x = self.a(x)
        return self.a(x)


def test_unknown_name_under_an_eager_root_gets_no_other_mode_hint_for_existing_names() -> None:
    # found while moving placement into the engine: names of children's graphs (a.add) are not
    # in the root's own analysis, and must not be offered as "exists in train mode only"
    with quiet_fallbacks(), pytest.raises(fxtap.TapNameError) as caught:
        fxtap.tap(_EagerRoot().eval(), ["a.add", "a_1.fc", "nope"])
    message = str(caught.value)
    assert message.startswith("no tap named 'a_1.fc', 'nope' in _EagerRoot")
    assert "train mode only" not in message


class _TuplePair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), x


class _PairUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _TuplePair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pair(x)
        if isinstance(p, tuple):  # a proxy is no tuple: the trace takes the other branch
            return p[0] * p[1]
        return p["u"] - p["v"]


def test_opaque_leaf_output_checked_with_isinstance() -> None:
    torch.manual_seed(0)
    model = _PairUser().eval()
    model.pair.register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(2, 4)
    with quiet_fallbacks():
        out = fxtap.tap(model, ["pair.a"], keep_output=True)(x)
    assert_same(out["output"], model(x))


@dataclasses.dataclass
class _UV:
    u: torch.Tensor
    v: torch.Tensor


class _DataPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> _UV:
        return _UV(self.a(x), x * 2)


class _DataPairUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _DataPair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pair(x)
        return p.u - p.v


def test_compare_checks_a_dataclass_value_field_by_field() -> None:
    # found by the thorough property run (a hooked module returning a dataclass): compare
    # compared the two dataclass values with ==, which compares their tensors and raised
    torch.manual_seed(0)
    model = _DataPairUser().eval()
    model.pair.register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(3, 4)
    with quiet_fallbacks():
        result = fxtap.compare(model, ["pair", "pair.a"], x)
    assert result.ok, str(result)
    assert [row.vs_truth for row in result.rows] == [0.0, 0.0]


class _ReluThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prod = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prod(x)
        self.act(h.view(-1, 2, 4))  # writes into h through a view
        return h


def test_cut_output_read_at_the_end_sees_in_place_writes_into_the_cut_input() -> None:
    # found by the thorough property run: the cut copied its input before the in-place ReLU
    # (so that the caller's tensor stays unchanged) but returned the uncopied input as the output
    torch.manual_seed(0)
    model = nn.Sequential(_ReluThroughView()).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        h = model[0].prod(x)
        given = h.clone()
        out = fxtap.cut(model, ["0.prod"], ["output"])(given)
        assert_same(out["output"], model(x))
    assert_same(given, h)  # the caller's tensor is not written into
