"""Code that tells a traced value's type apart runs eagerly (issue #13, bullet 4).

While torch.fx traces, what an opaque leaf returns, a traced op's value and the model's inputs are
Proxies: ``isinstance(p, tuple)`` is False where the model sees a tuple, ``isinstance(h,
torch.Tensor)`` is False where it sees a tensor, and a graph would hold the branch taken for a
Proxy. fxtap makes the module whose code asked run eagerly instead, and says so; a type check that
torch's own code makes on every argument (a ``SymInt`` check in ``torch.arange(x.shape[0])``) is no
reason to. Truth: the model run eagerly.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import fxtap
from support.truth import assert_same, quiet_fallbacks

W = 4
UV = collections.namedtuple("UV", "u v")


@dataclasses.dataclass
class UVData:
    u: torch.Tensor
    v: torch.Tensor


class _Two(nn.Module):
    """Returns two values in the container ``how`` names (or their sum, ``how="tensor"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(W, W)
        self.how = how

    def forward(self, x: torch.Tensor) -> Any:
        u, v = self.a(x), x * 2
        return {
            "tuple": lambda: (u, v),
            "list": lambda: [u, v],
            "namedtuple": lambda: UV(u, v),
            "dict": lambda: {"u": u, "v": v},
            "dataclass": lambda: UVData(u, v),
            "tensor": lambda: u + v,
        }[self.how]()


class _TellsApart(nn.Module):
    """Branches on the type of what ``two`` returned (each branch is a different computation)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.two = _Two(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.two(x)
        if isinstance(p, torch.Tensor):
            return p.tanh()
        if isinstance(p, UV):
            return p.u + p.v
        if isinstance(p, tuple):
            return p[0] * p[1]
        if isinstance(p, list):
            return p[0] - p[1]
        if dataclasses.is_dataclass(p):
            return p.u / (p.v.abs() + 1)
        return p["u"] - 3 * p["v"]


class _Outer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = _TellsApart(how)
        self.head = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


HOWS = ["tuple", "list", "namedtuple", "dict", "dataclass", "tensor"]


def _tap_warned(model: nn.Module, names: list[str]) -> tuple[fxtap.Tapped, str]:
    """``tap(model, names, keep_output=True)`` and the text of the FallbackWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, names, keep_output=True)
    return tapped, "\n".join(str(w.message) for w in caught if issubclass(w.category, fxtap.FallbackWarning))


@pytest.mark.parametrize("how", HOWS)
def test_caller_of_a_hooked_module_that_checks_its_output_type_runs_eagerly(how: str) -> None:
    torch.manual_seed(0)
    model = _Outer(how).eval()
    model.block.two.register_forward_hook(lambda module, inputs, output: None)  # 'block.two' is opaque
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["block", "head", "block.two.a"])
    assert "submodule 'block' (_TellsApart): checks the type of the output of 'block.two'" in warned
    out = tapped(x)
    assert_same(out["output"], model(x))
    assert_same(out["block"], model.block(x))
    # a leaf the user declares is a Proxy while tracing too: mode="fx" refuses, naming the check
    with pytest.raises(fxtap.TraceFailedError, match="submodule 'block' .*checks the type of the output of 'block.two'"):
        fxtap.tap(_Outer(how), ["head"], mode="fx", leaf_modules=[_Two])


class _ChecksOpValue(nn.Module):
    """``isinstance`` on a traced op's value, not a leaf's: a tensor when the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        if isinstance(h, torch.Tensor):
            h = self.fc(h)
        return h + 1


def test_isinstance_on_a_traced_op_value_runs_the_module_eagerly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_ChecksOpValue(), nn.Tanh()).eval()
    x = torch.randn(2, W)
    with quiet_fallbacks():
        out = fxtap.tap(model, ["0.fc", "1"], keep_output=True)(x)
    assert_same(out["output"], model(x))
    assert_same(out["0.fc"], model[0].fc(x * 2))


class _ChecksAbc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.two = _Two("tuple")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.two(x)
        return p[0] + p[1] if isinstance(p, collections.abc.Sequence) else p.sum(0)


def test_abstract_class_check_on_an_opaque_output_runs_eagerly() -> None:
    torch.manual_seed(0)
    model = _ChecksAbc().eval()
    model.two.register_forward_pre_hook(lambda module, inputs: None)
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["two.a"])
    assert "_ChecksAbc itself: checks the type of the output of 'two'" in warned
    assert_same(tapped(x)["output"], model(x))


class _RootChecksInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)

    def forward(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # a tensor when the model runs, a Proxy while tracing
            x = torch.stack(list(x))
        return self.fc(x)


def test_root_that_checks_its_input_type_runs_eagerly() -> None:
    torch.manual_seed(0)
    model = _RootChecksInput().eval()
    x = torch.randn(2, W)
    tapped, warned = _tap_warned(model, ["fc"])
    assert "checks the type of the input 'x'" in warned
    assert_same(tapped(x)["output"], model(x))


class _TorchChecksArguments(nn.Module):
    """Calls torch functions whose C argument parser checks each argument's type: no type check
    of the model's own, so the module stays in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(x.shape[0]) % 2
        h = self.fc(x).index_select(0, idx)
        if isinstance(self.scale, float):  # not a traced value
            h = h * self.scale
        return torch.cat([h, x], dim=1).view(x.shape[0], 2, W).sum(1)


def test_torch_argument_checks_and_checks_of_plain_values_keep_the_graph() -> None:
    torch.manual_seed(0)
    model = _TorchChecksArguments().eval()
    x = torch.randn(3, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["fc", "cat"], keep_output=True)
    assert tapped.mode == "fx"
    out = tapped(x)
    assert_same(out["output"], model(x))
