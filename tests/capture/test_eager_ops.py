"""Op names of code that runs eagerly (``_capture.eager_ops``): the own ops of a model whose
forward FX cannot trace, named as they run, with FX's grammar.

Two kinds of checks: the same-grammar proof (on models FX traces, every module's own ops named
eagerly mean what FX's names mean: ``support.eager_names``) and taps of such names on models FX
cannot trace, against the truth computed by hand.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from support import toy_models
from support.eager_names import agreement
from support.registry import CASES
from torch import nn

import fxtap
from fxtap._capture import eager_ops


def _quiet_tap(model: nn.Module, names: list[str], **options: Any) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, names, **options)


# -- the same grammar as FX ------------------------------------------------------------------------------
def _tv(name: str, size: int, **kwargs: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval(), (torch.randn(1, 3, size, size),)


def _toy(cls: type[nn.Module], *shapes: tuple[int, ...]) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    return cls().eval(), tuple(torch.randn(*s) for s in shapes)


def _timm(case: str) -> tuple[nn.Module, tuple[Any, ...]]:
    found = CASES[case]
    args, _ = found.inputs()
    return found.build(), args


MODELS = {
    "resnet18": lambda: _tv("resnet18", 64),
    "mobilenet_v3_small": lambda: _tv("mobilenet_v3_small", 64),
    "vit_b_16": lambda: _tv("vit_b_16", 32, image_size=32),
    "InplaceZoo": lambda: _toy(toy_models.InplaceZoo, (2, 4)),
    "AliasUpdate": lambda: _toy(toy_models.AliasUpdate, (2, 3), (2, 3)),
    "PosAdd": lambda: _toy(toy_models.PosAdd, (2, 3)),
    "Shared": lambda: _toy(toy_models.Shared, (2, 4)),
    "MultiIO": lambda: _toy(toy_models.MultiIO, (2, 4), (2, 4)),
    "WithPosEncoding": lambda: _toy(toy_models.WithPosEncoding, (2, 3)),
    "timm/vit_tiny_patch16_224": lambda: _timm("timm/vit_tiny_patch16_224"),
}
SLOW_MODELS = {
    "timm/mobilevitv2_050": lambda: _timm("timm/mobilevitv2_050"),
    "timm/eva02_tiny_patch14_224": lambda: _timm("timm/eva02_tiny_patch14_224"),
    "timm/swin_tiny_patch4_window7_224": lambda: _timm("timm/swin_tiny_patch4_window7_224"),
    "timm/levit_128s": lambda: _timm("timm/levit_128s"),
}
_EXPECT_BOTH = {"resnet18": 8, "mobilenet_v3_small": 10, "vit_b_16": 10, "Shared": 0}  # at least: the check is not vacuous


def _check_agreement(name: str, make: Any) -> None:
    model, args = make()
    found = agreement(model, args)
    assert found.differ == [], f"{name}: eager op names that mean other values than FX's: {found.differ}"
    assert found.eager_only == [], f"{name}: eager op names FX does not have: {found.eager_only}"
    assert len(found.both) >= _EXPECT_BOTH.get(name, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_eager_op_names_mean_what_fx_names_mean(name: str) -> None:
    _check_agreement(name, MODELS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_MODELS))
def test_eager_op_names_mean_what_fx_names_mean_on_timm(name: str) -> None:
    _check_agreement(name, SLOW_MODELS[name])


def _scaled_sum(x: torch.Tensor) -> torch.Tensor:
    return x + x * 0.5  # FX records one call of _scaled_sum: this add and mul are not its nodes


torch.fx.wrap("_scaled_sum")


class Wrapped(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(_scaled_sum(x) + 1)


def test_ops_inside_a_wrapped_function_take_no_name() -> None:
    found = agreement(Wrapped(), (torch.randn(2, 3),))
    assert found.differ == [] and found.eager_only == []
    assert found.both == ["relu"] and found.fx_only == ["_scaled_sum", "add"]


def test_agreement_sees_counters_that_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta-test: an eager naming that misses one op (every later ``_k`` shifted) fails the check."""
    record = eager_ops._Naming._record

    def drifting(self: Any, frame: Any, func: Any, kind: str, base: str, *rest: Any) -> None:
        if base == "add" and not self.__dict__.get("drifted"):
            self.__dict__["drifted"] = self.namer.node("add")  # as if an op only one frontend sees had been counted
        return record(self, frame, func, kind, base, *rest)

    class Adds(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + 1 + 2) * 3

    assert agreement(Adds(), (torch.ones(2),)).both == ["add", "add_1", "mul"]
    monkeypatch.setattr(eager_ops._Naming, "_record", drifting)
    found = agreement(Adds(), (torch.ones(2),))
    assert found.differ == ["add_1"] and found.eager_only == ["add_2"]


# -- taps of op names in eagerly running code --------------------------------------------------------------
class EagerRoot(nn.Module):
    """A root FX cannot trace (a branch on a value), with its own ops around a child it calls twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = toy_models.Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) + x  # add
        h = F.relu(h)  # relu
        if h.sum() > 0:  # sum, gt: untraceable
            h = h * 2  # mul
        h += 1  # add_1: writes into mul's output
        g = self.gate(h) / 3  # truediv
        return g - self.gate(g)  # sub


class GateOps(nn.Module):
    """An untraceable child with ops of its own, called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) * 2  # mul
        if y.mean() > 0:  # mean, gt
            y = y - 1  # sub
        return y + x  # add


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = GateOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 0:
            x = self.blk(self.blk(x))
        return x


def _model() -> tuple[EagerRoot, torch.Tensor]:
    torch.manual_seed(0)
    return EagerRoot().eval(), torch.randn(2, 4)


def _truth(model: EagerRoot, x: torch.Tensor) -> dict[str, torch.Tensor]:
    add = model.fc(x) + x
    relu = F.relu(add)
    h = relu * 2 if relu.sum() > 0 else relu
    h = h + 1
    truediv = model.gate(h) / 3
    return {"add": add, "relu": relu, "add_1": h, "truediv": truediv, "sub": truediv - model.gate(truediv)}


def test_root_op_names_are_the_values_eager_computes() -> None:
    model, x = _model()
    names = ["add", "relu", "add_1", "truediv", "sub", "gate"]
    out = _quiet_tap(model, names)(x)
    with torch.no_grad():
        truth = _truth(model, x)
    for name, value in truth.items():
        assert torch.equal(out[name], value), name
    assert list(out) == names


def test_op_value_is_taken_before_a_later_in_place_write() -> None:
    model, x = _model()
    out = _quiet_tap(model, ["mul", "add_1"])(x)  # `h += 1` writes into mul's output
    with torch.no_grad():
        relu = F.relu(model.fc(x) + x)
    assert relu.sum() > 0  # the branch runs
    assert torch.equal(out["mul"], relu * 2)
    assert torch.equal(out["add_1"], relu * 2 + 1)


def test_gradients_flow_through_eager_op_values() -> None:
    model, x = _model()
    out = _quiet_tap(model, ["add"])(x)
    out["add"].sum().backward()
    got = model.fc.weight.grad.clone()
    model.zero_grad()
    (model.fc(x) + x).sum().backward()
    assert torch.equal(got, model.fc.weight.grad)
    assert not _quiet_tap(model, ["add"], detach=True)(x)["add"].requires_grad


def test_an_eager_child_called_twice_numbers_its_ops_per_call() -> None:
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(2, 4)
    out = _quiet_tap(model, ["blk.mul", "blk.add", "blk.mul_1", "blk.add_1"])(x)
    with torch.no_grad():
        first = model.blk(x)
        mul_1 = model.blk.a(first) * 2
    assert torch.equal(out["blk.mul"], model.blk.a(x) * 2)
    assert torch.equal(out["blk.add"], first)
    assert torch.equal(out["blk.mul_1"], mul_1)
    assert torch.equal(out["blk.add_1"], model.blk(first))


def test_an_op_name_the_call_does_not_produce_fails_at_the_call_listing_the_produced_ones() -> None:
    model, x = _model()
    tapped = _quiet_tap(model, ["add_7"])  # no graph lists the root's ops: the call checks the name
    with pytest.raises(fxtap.TapNameError, match="no op named 'add_7' in EagerRoot's own forward") as error:
        tapped(x)
    assert "The op names it produced: 'add', 'relu', 'sum', 'gt'" in str(error.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # nothing left behind


def test_a_name_that_is_no_op_still_fails_at_tap() -> None:
    model, _ = _model()
    with pytest.raises(fxtap.TapNameError, match="no tap named 'fc9'"):
        _quiet_tap(model, ["fc9"])


def test_nothing_is_installed_when_no_op_name_of_eager_code_is_requested() -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # runs eagerly: the tapped call is the only one that runs this line
                seen.append(len(torch.overrides._get_current_function_mode_stack()))
            return x

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.probe = Probe()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                x = x + 1
            return self.probe(x)

    model = Root()
    _quiet_tap(model, ["probe"])(torch.ones(2))  # the first call also runs a twin before it tries torch.export
    without = list(seen)
    seen.clear()
    _quiet_tap(model, ["probe", "add"])(torch.ones(2))
    assert without and set(without) == {0}
    assert seen and set(seen) == {1}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_listing_the_op_names_of_one_call() -> None:
    model, x = _model()
    before = [b.clone() for b in model.buffers()]
    names = eager_ops.list_ops(model, (x,), {}, [""])
    assert names[:4] == ["add", "relu", "sum", "gt"] and "truediv" in names and "sub" in names
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_a_name_after_a_size_read_is_not_given() -> None:
    """``x.size(0)`` is a traced value for FX, and Python arithmetic on it would take names that
    eager code cannot see: operator names after it are refused, with the reason."""

    class Root(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.size(0)
            if x.sum() > 0:
                x = x * 2
            return x.view(n, -1) + 1

    tapped = _quiet_tap(Root(), ["view", "add"])
    with pytest.raises(fxtap.TapNameError, match="no 'add' is named there, because after size\\(\\) returned a int"):
        tapped(torch.ones(2, 3))
    assert torch.equal(_quiet_tap(Root(), ["view"])(torch.ones(2, 3))["view"], torch.full((2, 3), 2.0))


# -- Hugging Face roots -------------------------------------------------------------------------------------
def _hf(name: str) -> tuple[nn.Module, torch.Tensor]:
    case = CASES[f"transformers/{name}"]
    args, _ = case.inputs()
    return case.build(), args[0]


@pytest.mark.slow  # 7 s; LlamaModel's root ops run by default (test_mask_ops_at_the_root)
def test_gpt2_root_ops_in_mixed_mode_and_from_the_export_graph() -> None:
    model, ids = _hf("GPT2Model")
    length = ids.shape[1]
    tapped = _quiet_tap(model, ["view", "to", "view_1", "h.0.attn"])
    first = tapped(ids)  # mixed mode, then the export
    assert tapped.mode == "mixed"
    second = tapped(ids)  # the exported graph
    assert tapped.mode == "export" and set(tapped.paths.values()) == {"export"}
    with torch.no_grad():
        truth = {
            "view": ids.view(-1, length),  # input_ids.view(-1, input_shape[-1])
            "to": model.wpe(torch.arange(length)[None]),  # position_embeds.to(inputs_embeds.device)
            "view_1": model(ids).last_hidden_state,  # hidden_states.view(output_shape)
        }
    for name, value in truth.items():
        assert torch.equal(first[name], value), name
        assert torch.equal(second[name], value), name
    longer = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        assert torch.equal(tapped(longer)["view_1"], model(longer).last_hidden_state)


def test_gpt2_root_add_is_refused_with_the_reason() -> None:
    """The embeddings add: FX would count ``torch.arange(...) + past_seen_tokens`` (a size-derived
    add) before it, so eager code cannot know its number and gives no name."""
    model, ids = _hf("GPT2Model")
    with pytest.raises(fxtap.TapNameError, match="no 'add' is named there") as error:
        _quiet_tap(model, ["add"])(ids)
    assert "'size', 'view', 'to', 'size_1', 'view_1'" in str(error.value)


@pytest.mark.parametrize(("name", "reduced"), [("BertModel", "all"), ("LlamaModel", "sum")])
def test_mask_ops_at_the_root(name: str, reduced: str) -> None:
    model, ids = _hf(name)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    tapped = _quiet_tap(model, ["to", reduced])
    out = tapped(ids, attention_mask=mask)
    again = tapped(ids, attention_mask=mask)
    padding = mask.to(torch.bool)  # transformers' masking_utils: attention_mask.to(device=..., dtype=torch.bool)
    assert torch.equal(out["to"], padding) and torch.equal(again["to"], padding)
    truth = padding.all() if reduced == "all" else padding.sum()
    assert torch.equal(out[reduced], truth) and torch.equal(again[reduced], truth)


# -- opaque leaves of a traced model, and listing ----------------------------------------------------------
def test_ops_of_an_opaque_leaf_of_a_traced_model() -> None:
    torch.manual_seed(0)
    model, x = toy_models.DataDependent().eval(), torch.randn(2, 4)
    tapped = _quiet_tap(model, ["gate.sum", "post"])
    out = tapped(x)
    assert tapped.mode == "mixed" and tapped.paths == {"gate.sum": "hook", "post": "fx"}
    with torch.no_grad():
        assert torch.equal(out["gate.sum"], model.pre(x).sum())
        assert torch.equal(out["post"], model(x))
    only = _quiet_tap(model, ["gate.gt"])(x)  # the graph still runs the leaf that holds it
    assert torch.equal(only["gate.gt"], model.pre(x).sum() > 0)
    with pytest.raises(fxtap.TapNameError, match="The op names it produced: 'gate.sum', 'gate.gt'"):
        _quiet_tap(model, ["gate.add"])(x)
    with pytest.raises(fxtap.TapNameError, match="no tap named 'sum'"):  # the root is traced: no deferral
        _quiet_tap(model, ["sum"])
    with pytest.raises(fxtap.FxtapError, match="Hooks cannot be exported"):
        _quiet_tap(model, ["gate.sum"]).graph_module()


def test_op_names_lists_what_tap_accepts_for_that_call() -> None:
    model, x = _model()
    names = eager_ops.op_names(model, (x,), {})
    assert names[:4] == ["add", "relu", "sum", "gt"] and "gate.sum" in names
    out = _quiet_tap(model, names)(x)
    assert list(out) == names
    gpt2, ids = _hf("GPT2Model")
    assert eager_ops.op_names(gpt2, (ids,), {}) == ["size", "view", "to", "size_1", "view_1"]


def test_a_scope_holding_a_torchscript_module_names_nothing() -> None:
    """A scripted child runs no Python hooks: what it returns cannot be followed, so no name is
    given in the code around it (rather than names counted without its outputs)."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scripted = torch.jit.script(nn.Linear(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                x = x * 2
            return self.scripted(x) + 1

    with pytest.raises(fxtap.TapNameError, match="it holds the TorchScript module 'scripted'"):
        _quiet_tap(Root(), ["add"])(torch.ones(2, 4))
