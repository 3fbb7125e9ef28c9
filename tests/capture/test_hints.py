"""torchvision's tracer hints (#18 item 7): ``leaf_modules=`` and ``autowrap_functions=``.

The model is torchvision's own test model for them (test_backbone_utils.py): its root calls a
plain function that runs ``int()`` on a shape, and a module that does the same. Without hints
fxtap runs the root eagerly; with them one graph computes every name, as torchvision does.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxtap
from support.truth import assert_same


def leaf_function(x: int) -> int:
    return int(x)  # a TypeError on a proxy, unless FX records the call as one step


class LeafModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int(x.shape[0])  # a TypeError on a proxy, unless FX keeps the module as one step
        return F.relu(x + 4)


class TestModule(nn.Module):
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(1, 1)
        self.leaf_module = LeafModule()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaf_function(x.shape[0])
        x = self.dense(x)
        x = self.leaf_module(x)
        return F.relu(x + 1)


HINTS = {"leaf_modules": [LeafModule], "autowrap_functions": [leaf_function]}


def test_without_hints_the_root_runs_eagerly() -> None:
    with pytest.warns(fxtap.FallbackWarning, match="TestModule itself"):
        tapped = fxtap.tap(TestModule(), ["dense", "leaf_module"])
    assert tapped.mode != "fx"


def test_hints_give_one_graph_with_torchvisions_names() -> None:
    torch.manual_seed(0)
    model = TestModule()
    listed = fxtap.names(model, **HINTS)
    assert listed == ["x", "getattr", "getitem", "leaf_function", "dense", "leaf_module", "add", "relu"]
    x = torch.randn(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["dense", "leaf_module", "add"], keep_output=True, **HINTS)
    assert tapped.mode == "fx"
    out = tapped(x)
    dense = model.dense(x)
    assert_same(out["dense"], dense.detach())
    assert_same(out["leaf_module"], F.relu(dense + 4).detach())
    assert_same(out["add"], (F.relu(dense + 4) + 1).detach())
    assert_same(out["output"], model(x).detach())
    assert tapped.graph_module().graph.find_nodes(op="call_module", target="leaf_module")


def test_hints_apply_under_an_eager_root_too() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TestModule()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent: the outer root runs eagerly
                x = -x
            return self.inner(x)

    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["inner.dense", "inner.add"], **HINTS)
    assert tapped.paths == {"inner.dense": "fx", "inner.add": "fx"}
    dense = model.inner.dense(x)
    assert_same(tapped(x)["inner.add"], (F.relu(dense + 4) + 1).detach())


@pytest.mark.parametrize(
    ("hints", "message"),
    [
        ({"leaf_modules": [LeafModule()]}, r"leaf_modules lists nn.Module classes .* type\(module\)"),
        ({"leaf_modules": ["LeafModule"]}, r"leaf_modules lists nn.Module classes"),
        ({"autowrap_functions": [len]}, r"autowrap_functions lists plain Python functions"),
    ],
)
def test_hints_are_checked(hints: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        fxtap.tap(TestModule(), ["dense"], **hints)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        fxtap.names(TestModule(), **hints)  # type: ignore[arg-type]
