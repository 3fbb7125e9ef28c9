"""Code that sets the random generator's state runs eagerly (torch.random.fork_rng, get/set_rng_state,
manual_seed in ``forward``): a graph records the draws, not the state put back, so its later draws
would differ from eager, and so would every value after them, the generator the user sees included.

Each model runs tapped and, beside it, a deep copy eagerly, three calls from the same seed each:
values and the generator's state after the call must match, on the FX path (the block as a child),
under an eagerly running root and on the torch.export frontend (the block as the root).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support.truth import assert_same
from torch import nn

import fxtap


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)


class ForkRng(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng():
            x = x + torch.randn_like(x)
        return self.drop(self.fc(x))


class PutBack(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = torch.random.get_rng_state()
        x = x * torch.rand_like(x)
        torch.random.set_rng_state(state)
        return self.drop(self.fc(x))


class Reseeds(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)
        return self.drop(self.fc(x + torch.randn_like(x)))


class OwnGenerator(_Block):
    """Not a hazard: draws from a generator of its own, which the graph holds and moves on too."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x + torch.randn(x.shape, generator=self.generator)))


class Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.inner = inner
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inner(self.stem(x))) + torch.rand_like(x))


class EagerOuter(Outer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if h.sum() > 1e9:  # FX cannot trace this root (and torch.export cannot either)
            h = h * 0
        return self.head(torch.relu(self.inner(h)) + torch.rand_like(x))


HAZARDS = {"fork_rng": ForkRng, "put_back": PutBack, "reseeds": Reseeds}


def _compare(model: nn.Module, names: list[str]) -> fxtap.Tapped:
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, names, keep_output=True)
    x = torch.randn(3, 4)
    for seed in range(3):  # the third call runs the exported graph where there is one
        torch.manual_seed(seed)
        out = tapped(x)
        after = torch.rand(4)
        torch.manual_seed(seed)
        expected = twin(x)
        assert_same(out["output"], expected)
        assert_same(after, torch.rand(4))  # the generator is where the eager forward left it
    return tapped


@pytest.mark.parametrize("where", ["child_of_traced_root", "child_of_eager_root", "root"])
@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_a_forward_that_sets_the_generator_state_runs_eagerly(hazard: str, where: str) -> None:
    torch.manual_seed(0)
    block = HAZARDS[hazard]().train()
    if where == "root":
        tapped = _compare(block, ["fc"])
        assert tapped.paths == {"fc": "hook"}
    else:
        model = (Outer if where == "child_of_traced_root" else EagerOuter)(block).train()
        tapped = _compare(model, ["stem", "inner.fc", "inner", "head"])
        assert tapped.paths["inner.fc"] == "hook"
    assert "sets the random number generator's state" in tapped.report()


def test_a_generator_of_its_own_keeps_the_graph() -> None:
    torch.manual_seed(0)
    tapped = _compare(Outer(OwnGenerator()).train(), ["stem", "inner.fc", "inner", "head"])
    assert tapped.mode == "fx" and set(tapped.paths.values()) == {"fx"}


def test_mode_fx_refuses_a_forward_that_sets_the_generator_state() -> None:
    with pytest.raises(fxtap.TraceFailedError, match="random number generator's state"):
        fxtap.tap(Outer(ForkRng()), ["inner.fc"], mode="fx")
