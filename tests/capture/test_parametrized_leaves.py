"""A parametrized user module is still user code (issue #13): its class, made by
``torch.nn.utils.parametrize``, has that module's name, and must not pass for ``torch.nn``'s own.

Truth: a deep copy of the model run eagerly, call after call (values and buffers).
"""

from __future__ import annotations

import copy
import warnings

import torch
from support.truth import assert_same
from torch import nn
from torch.nn.utils import parametrize

import fxtap
from fxtap._capture.prune import from_torch_nn


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


class _Counting(nn.Module):
    """User code with a parametrized weight, counting its calls in a buffer (in any mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x @ self.weight


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.block = _Counting()
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_parametrized_user_class_is_not_torch_nn() -> None:
    block = _Counting()
    parametrize.register_parametrization(block, "weight", _Doubled())
    assert type(block).__module__ == "torch.nn.utils.parametrize"
    assert not from_torch_nn(block)
    linear = nn.Linear(2, 2)
    parametrize.register_parametrization(linear, "weight", _Doubled())
    assert from_torch_nn(linear)


def test_opaque_parametrized_user_block_updates_its_buffer_once_per_call() -> None:
    # the block is opaque (a user hook) and the early tap does not need it: it still runs,
    # because fxtap cannot see what its code changes (its call counter)
    torch.manual_seed(0)
    model = _Net()
    parametrize.register_parametrization(model.block, "weight", _Doubled())
    model.eval()  # after: the parametrization's own modules are made in training mode
    model.block.register_forward_hook(lambda module, inputs, output: None)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["stem"])
    for _ in range(3):
        out = tapped(x)
        twin(x)
    assert_same(out["stem"], twin.stem(x))
    assert_same(model.block.calls, twin.block.calls)
    assert float(model.block.calls) == 3.0
