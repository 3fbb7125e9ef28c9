"""Odd module trees and outputs (#18 item 3): each works as eagerly, or says why it cannot.

Submodules named with Python keywords, modules returning namedtuples, dataclasses or
``ModelOutput``, one module registered under two names, and names that never run as a module.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import fxtap
from support.truth import assert_same

Pair = collections.namedtuple("Pair", "a b")


@dataclasses.dataclass
class PairData:
    a: torch.Tensor
    b: torch.Tensor


def _model_output() -> type:
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class PairOutput(ModelOutput):  # type: ignore[misc]
        a: torch.Tensor | None = None
        b: torch.Tensor | None = None

    return PairOutput


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"in": nn.Linear(2, 2), "out": nn.Linear(2, 2), "class": nn.Linear(2, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d["out"](self.d["in"](x)) + self.d["class"].weight.sum()


class Holder(nn.Module):
    """A traceable child holding keyword-named modules: only that child falls back."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(2, 2)
        self.kw = Keywords()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kw(self.pre(x)) * 2


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fn()


@pytest.mark.parametrize("model_cls", [Keywords, Holder])
@pytest.mark.parametrize("mode", ["auto", "hooks"])
def test_keyword_named_submodules_fall_back(model_cls: type[nn.Module], mode: str) -> None:
    torch.manual_seed(0)
    model = model_cls()
    prefix = "kw." if model_cls is Holder else ""
    names = [f"{prefix}d.in", f"{prefix}d.out"]
    assert set(names) <= set(_quiet(lambda: fxtap.names(model, mode=mode)))
    x = torch.randn(3, 2)
    d = model.kw.d if model_cls is Holder else model.d
    x_in = model.pre(x) if model_cls is Holder else x
    out = _quiet(lambda: fxtap.tap(model, names, mode=mode, keep_output=True))(x)
    assert_same(out[names[0]], d["in"](x_in).detach())
    assert_same(out[names[1]], d["out"](d["in"](x_in)).detach())
    assert_same(out["output"], model(x).detach())


def test_keyword_named_submodule_is_named_in_the_warning_and_fx_mode_error() -> None:
    with pytest.warns(fxtap.FallbackWarning, match=r"submodule 'kw' \(Keywords\).*'kw\.d\.in', and 'in' is a Python keyword"):
        tapped = fxtap.tap(Holder(), ["pre", "kw.d.in"])
    assert tapped.paths == {"pre": "fx", "kw.d.in": "hook"}
    with pytest.raises(fxtap.TraceFailedError, match=r"cannot write the code of submodule 'kw'"):
        fxtap.tap(Holder(), ["pre"], mode="fx")


class Gain(float):
    """A float whose repr is no Python: FX writes constants with repr, so its code cannot compile."""

    def __repr__(self) -> str:
        return f"Gain<{float(self)}>"


class GainUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.gain = Gain(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) * self.gain)


def test_graph_whose_code_fx_cannot_write_falls_back() -> None:
    # tap() writes only the built graph's code; when FX cannot write it, it traces again, checking
    # each traced graph's code, and the code to blame (here the root's) runs eagerly
    torch.manual_seed(0)
    model = GainUser()
    x = torch.randn(3, 2)
    with pytest.warns(fxtap.FallbackWarning, match=r"cannot trace the forward of GainUser itself: SyntaxError"):
        tapped = fxtap.tap(model, ["fc", "head"], keep_output=True)
    out = tapped(x)
    assert_same(out["fc"], model.fc(x))
    assert_same(out["output"], model(x))
    with pytest.raises(fxtap.TraceFailedError, match="cannot write the code of the forward of GainUser itself"):
        fxtap.tap(model, ["head"], mode="fx")
    # a graph that needs no unwritable code is written: "fc" alone does not read the constant
    assert fxtap.tap(model, ["fc"], mode="fx")(x)["fc"].equal(model.fc(x))


class Returns(nn.Module):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.make = make

    def forward(self, x: torch.Tensor) -> Any:
        y = self.lin(x)
        return self.make(y, y + 1)


class Uses(nn.Module):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.inner = Returns(make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out.a * out.b


def _containers() -> list[Any]:
    return [
        pytest.param(lambda a, b: Pair(a, b), Pair, id="namedtuple"),
        pytest.param(lambda a, b: PairData(a, b), PairData, id="dataclass"),
        pytest.param("ModelOutput", None, id="ModelOutput"),
    ]


@pytest.mark.parametrize(("make", "cls"), _containers())
@pytest.mark.parametrize("mode", ["auto", "fx", "hooks"])
def test_module_returning_a_structured_value(make: Any, cls: Any, mode: str) -> None:
    if make == "ModelOutput":
        cls = _model_output()
        make = lambda a, b: cls(a=a, b=b)  # noqa: E731
    torch.manual_seed(0)
    model = Uses(make)
    x = torch.randn(3, 2)
    assert "inner" in fxtap.names(model, mode=mode)
    tapped = fxtap.tap(model, ["inner", "inner.lin"], mode=mode, keep_output=True)
    for _ in range(2):  # every call, not only the first
        out = tapped(x)
        y = model.inner.lin(x)
        assert type(out["inner"]) is cls
        assert_same(out["inner"].a, y.detach())
        assert_same(out["inner"].b, (y + 1).detach())
        assert_same(out["output"], model(x).detach())
    if mode != "hooks":
        assert type(tapped.graph_module()(x)["inner"]) is cls


class TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = nn.Linear(2, 2)  # one module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["auto", "fx", "hooks"])
def test_module_under_two_names_is_named_by_its_first_path(mode: str) -> None:
    torch.manual_seed(0)
    model = TwoNames()
    x = torch.randn(3, 2)
    listed = fxtap.names(model, mode=mode)  # hooks list first calls only: later ones exist once it runs
    assert [n for n in listed if n in ("a", "a_1", "b")] == (["a"] if mode == "hooks" else ["a", "a_1"])
    out = fxtap.tap(model, ["a", "a_1"], mode=mode)(x)
    assert_same(out["a"], model.a(x).detach())
    assert_same(out["a_1"], model(x).detach())
    for name in ("b", "b_1"):
        with pytest.raises(fxtap.TapNameError, match=r"'b' is the module registered first as 'a'.*'a', 'a_1'"):
            fxtap.tap(model, [name], mode=mode)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_listed_name_that_never_runs_as_a_module_says_why() -> None:
    model = Attention()
    assert "attn.out_proj" not in fxtap.names(model)  # nn.MultiheadAttention never calls it: not listed
    tapped = fxtap.tap(model, ["attn.out_proj"])  # still a module path tap() accepts
    with pytest.raises(fxtap.MissingCallError, match=r"'attn.out_proj' never ran as a module.*out_proj.*Tap the module around it instead \('attn'\)"):
        tapped(torch.randn(3, 1, 4))


def test_containers_under_an_eager_root_are_not_listed() -> None:
    class Eager(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                x = -x
            for block in self.blocks:
                x = block(x)
            return x

    listed = fxtap.names(Eager())
    assert "blocks" not in listed and {"blocks.0", "blocks.1"} <= set(listed)
    x = torch.randn(2, 2)
    assert set(_quiet(lambda: fxtap.tap(Eager(), listed))(x)) == set(listed)


class Scaler:
    """A plain object a module caches on itself at its first call (torchvision's LevelMapper)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def apply_scaler(x: torch.Tensor, scaler: Scaler | None) -> torch.Tensor:
    return x if scaler is None else scaler(x)


torch.fx.wrap("apply_scaler")


class UsesCachedObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scaler: Scaler | None = None  # set on first use by the model's owner, as MultiScaleRoIAlign does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_scaler(self.lin(x), self.scaler)


def test_object_attribute_passed_to_a_wrapped_function_stays_in_the_graph() -> None:
    # torchvision's MultiScaleRoIAlign caches a LevelMapper on itself at its first call and passes
    # it to a torch.fx.wrap'd function: FX cannot write that object as a literal (it failed the
    # trace, so the names changed after one eager forward of maskrcnn_resnet50_fpn_v2)
    torch.manual_seed(0)
    model = UsesCachedObject()
    model.scaler = Scaler(3.0)
    assert fxtap.names(model) == ["x", "lin", "apply_scaler"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["lin", "apply_scaler"])
    assert tapped.mode == "fx"
    x = torch.randn(2, 2)
    assert_same(tapped(x)["apply_scaler"], model(x).detach())
