"""Plain regression tests: counterexamples found by the property tests (tests/test_properties.py).

Each is the smallest model found for one bug; each failed before its fix in fxtap.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxtap
from truth import assert_same, hook_truth


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
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
