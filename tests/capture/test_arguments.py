"""Non-tensor arguments of every shape (#18 item 2): each call gives the eager result, by a graph.

Tuple and list defaults, lists passed in a call (positionally or by keyword), tensor defaults,
and ``torch.compile`` of a Tapped called with a non-default argument.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxtap
from support.truth import assert_same


class PoolTo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int] = (2, 2)) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, size)
        return self.fc(y.flatten(1)[:, :4])


class Scales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, scales: list[float] = [1.0, 2.0]) -> torch.Tensor:  # noqa: B006
        y = self.fc(x)
        for s in scales:  # a loop over the list: it must be a list while tracing, not a placeholder
            y = y * s
        return y


class TensorDefault(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor = torch.ones(2)) -> torch.Tensor:  # noqa: B008
        return self.fc(x) + bias


def _eager_fc(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        model(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0]


CASES = [
    pytest.param(PoolTo, lambda x: ((x,), {}), id="tuple-default"),
    pytest.param(PoolTo, lambda x: ((x, (1, 4)), {}), id="tuple-passed"),
    pytest.param(PoolTo, lambda x: ((x,), {"size": [4, 1]}), id="list-keyword"),
    pytest.param(Scales, lambda x: ((x,), {}), id="list-default"),
    pytest.param(Scales, lambda x: ((x, [3.0, 0.5, 2.0]), {}), id="list-passed"),
    pytest.param(Scales, lambda x: ((x,), {"scales": []}), id="empty-list-keyword"),
    pytest.param(TensorDefault, lambda x: ((x,), {}), id="tensor-default"),
    pytest.param(TensorDefault, lambda x: ((x, torch.zeros(2)), {}), id="tensor-passed"),
]


def _input(model_cls: type[nn.Module]) -> torch.Tensor:
    return torch.randn(2, 1, 4, 4) if model_cls is PoolTo else torch.randn(3, 2)


@pytest.mark.parametrize(("model_cls", "call"), CASES)
def test_non_tensor_arguments_equal_eager_by_one_graph(model_cls: type[nn.Module], call: Any) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x = _input(model_cls)
    args, kwargs = call(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)  # a graph, no fallback
        tapped = fxtap.tap(model, ["fc"], keep_output=True)
        for _ in range(2):
            out = tapped(*args, **kwargs)
            assert_same(out["output"], model(*args, **kwargs).detach())
            assert_same(out["fc"], _eager_fc(model, *args, **kwargs))
        assert tapped.mode == "fx"


def test_list_argument_keys_graphs_by_its_contents() -> None:
    torch.manual_seed(0)
    model = Scales()
    tapped = fxtap.tap(model, ["fc"], keep_output=True)
    x = torch.randn(3, 2)
    scales = [2.0]
    first = tapped(x, scales)["output"]
    scales.append(3.0)  # the same list object, new contents: a new graph
    assert_same(tapped(x, scales)["output"], model(x, scales).detach())
    assert_same(first, model(x, [2.0]).detach())


def test_graph_module_with_a_tensor_default_takes_it_as_an_input() -> None:
    model = TensorDefault()
    gm = fxtap.tap(model, ["fc"], keep_output=True).graph_module()
    x = torch.randn(3, 2)
    assert_same(gm(x, torch.ones(2))["output"], model(x).detach())


def test_compiled_tapped_with_non_default_arguments() -> None:
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.fc(x) * scale

    model = Scaled()
    compiled = torch.compile(fxtap.tap(model, ["fc"], keep_output=True), backend="eager")
    x = torch.randn(3, 2)
    for args, kwargs in [((), {}), ((2.0,), {}), ((), {"scale": 3.0})]:
        torch.testing.assert_close(compiled(x, *args, **kwargs)["output"], model(x, *args, **kwargs).detach())


class Keywords(nn.Module):
    """``**kwargs``: FX keeps it as one placeholder, so the call's keywords must reach the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fc(x) * kwargs.get("scale", 1.0) + kwargs.get("shift", 0.0)


class KeywordsPassedOn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TensorDefault()

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.inner(x, **kwargs) * 2


@pytest.mark.parametrize(
    ("model_cls", "kwargs"),
    [
        pytest.param(Keywords, {}, id="none"),
        pytest.param(Keywords, {"scale": 3.0}, id="float"),
        pytest.param(Keywords, {"scale": torch.tensor(2.0), "shift": torch.ones(2)}, id="tensors"),
        pytest.param(KeywordsPassedOn, {}, id="passed-on-none"),
        pytest.param(KeywordsPassedOn, {"bias": torch.zeros(2)}, id="passed-on-tensor"),
    ],
)
def test_var_keyword_arguments_reach_the_model(model_cls: type[nn.Module], kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, [next(n for n in fxtap.names(model) if n.endswith("fc"))], keep_output=True)
    for _ in range(2):
        assert_same(tapped(x, **kwargs)["output"], model(x, **kwargs).detach())
