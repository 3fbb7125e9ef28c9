"""Semantics a graph cannot hold run eagerly (issue #13, item 4): one small model per hazard.

Each model is tapped (``keep_output=True``) and, next to it, a deep copy runs eagerly with plain
forward hooks (``support.truth``); values, dtypes, ``requires_grad``, gradients and Python state
must match call after call, the FX path must say why the module is opaque, ``mode="fx"`` must
refuse naming it, and the user's model keeps its hooks and nothing more.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.truth import assert_same, hook_truth, model_fingerprint
from torch import nn
from torch.utils import checkpoint

import fxtap


class _Stack(nn.Module):
    """``stem -> blocks[0..2] -> head``; ``blocks.1`` is the block under test."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.Sequential(_Plain(), middle, _Plain())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class NoGrad(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.fc(x)
        return x + y * 2


class EnableGrad(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return x + self.fc(x)


class SetGradEnabled(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(False):
            y = self.fc(x).relu()
        return x - y


class DecoratedNoGrad(_Plain):
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class Inference(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self.fc(x.detach())
        return y.clone() + 1


class Autocast(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.fc(x)
        return x + y.float() * 2  # 'blocks.1.fc' is bfloat16, as eagerly


class AutocastOff(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.fc(x.float()) + 1


class SavedHooks(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t * 1, lambda t: t):
            return torch.tanh(self.fc(x)) * x


class Checkpointed(_Plain):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + checkpoint.checkpoint(self.inner, self.fc(x), use_reentrant=self.reentrant)


class WarmUp(_Plain):
    """A warm-up ramp: ``self.step`` counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        return x + min(1.0, self.step / 3) * self.fc(x)


class ListCache(_Plain):
    """Keeps every input it saw and mixes in the previous one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.seen[-1] if self.seen else torch.zeros_like(x)
        self.seen.append(x.detach())
        return self.fc(x) + previous


class ChildWrites(_Plain):
    """Writes Python state on a child module, not on itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc.calls = getattr(self.fc, "calls", 0) + 1
        return self.fc(x) * self.fc.calls


def _steer(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output * -3.0  # activation steering: the hook replaces the output


def _pre_scale(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (inputs[0] * 0.5,)


def _pre_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (args[0] + 1.0,), kwargs


def _hooked(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = _Stack(_Plain())
        target = model.blocks[1]
        if kind == "forward":
            target.register_forward_hook(_steer)
        elif kind == "pre":
            target.register_forward_pre_hook(_pre_scale)
        elif kind == "pre_kwargs":
            target.register_forward_pre_hook(_pre_kwargs, with_kwargs=True)
        elif kind == "forward_kwargs":
            target.register_forward_hook(lambda m, a, k, o: o + 5.0, with_kwargs=True)
        return model

    return make


CONTEXTS: dict[str, Callable[[], nn.Module]] = {
    "no_grad": lambda: _Stack(NoGrad()),
    "enable_grad": lambda: _Stack(EnableGrad()),
    "set_grad_enabled": lambda: _Stack(SetGradEnabled()),
    "decorated_no_grad": lambda: _Stack(DecoratedNoGrad()),
    "inference_mode": lambda: _Stack(Inference()),
    "autocast": lambda: _Stack(Autocast()),
    "autocast_off": lambda: _Stack(AutocastOff()),
    "saved_tensors_hooks": lambda: _Stack(SavedHooks()),
    "checkpoint": lambda: _Stack(Checkpointed(reentrant=False)),
    "checkpoint_reentrant": lambda: _Stack(Checkpointed(reentrant=True)),
    "warm_up_counter": lambda: _Stack(WarmUp()),
    "list_cache": lambda: _Stack(ListCache()),
    "child_attribute_write": lambda: _Stack(ChildWrites()),
    "forward_hook": _hooked("forward"),
    "forward_pre_hook": _hooked("pre"),
    "pre_hook_with_kwargs": _hooked("pre_kwargs"),
    "forward_hook_with_kwargs": _hooked("forward_kwargs"),
}
NAMES = ["stem", "blocks.0.add", "blocks.1", "blocks.1.fc", "blocks.2.add", "head"]


def _eager(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Hook clones of every module call, and the output (with its autograd graph)."""
    kept: dict[str, Any] = {}
    result: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        result["output"] = output

    handle = model.register_forward_hook(keep)
    try:
        kept = hook_truth(model, x)
    finally:
        handle.remove()
    return kept, result["output"]


def _tap(model: nn.Module, names: list[str], **options: Any) -> fxtap.Tapped:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, names, keep_output=True, **options)
    tapped.caught = caught  # type: ignore[attr-defined]
    return tapped


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("hazard", list(CONTEXTS))
def test_hazard_runs_eagerly_and_matches_eager(hazard: str, grad: bool) -> None:
    torch.manual_seed(0)
    model = CONTEXTS[hazard]()
    twin = copy.deepcopy(model)
    tapped = _tap(model, NAMES)
    reasons = " ".join(str(w.message) for w in tapped.caught)  # type: ignore[attr-defined]
    assert "blocks.1" in reasons, reasons
    assert tapped.paths["blocks.1.fc"] == "hook" and tapped.paths["stem"] == "fx"
    assert "blocks.1" in tapped.report()
    x = torch.randn(2, 4)
    for _ in range(3):  # Python state (counters, caches) must advance exactly as eagerly
        with torch.set_grad_enabled(grad):
            out = tapped(x)
            truth, eager_output = _eager(twin, x)
        for name in NAMES:
            expected = truth.get(name)
            if expected is not None:
                assert_same(out[name], expected)
                assert out[name].dtype == expected.dtype
        assert_same(out["blocks.1"], truth["blocks.1"])
        assert out["output"].dtype == eager_output.dtype
        assert out["output"].requires_grad == eager_output.requires_grad
        assert out["output"].is_inference() == eager_output.is_inference()
        assert_same(out["output"], eager_output.detach())
        if grad and eager_output.requires_grad:
            out["output"].float().sum().backward()
            eager_output.float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    for key, value in vars(model.blocks[1]).items():
        if isinstance(value, int):
            assert value == vars(twin.blocks[1])[key], key
    if isinstance(model.blocks[1], ListCache):
        assert len(model.blocks[1].seen) == len(twin.blocks[1].seen) == 3


@pytest.mark.parametrize("hazard", list(CONTEXTS))
def test_hazard_refused_by_mode_fx_naming_the_module(hazard: str) -> None:
    model = CONTEXTS[hazard]()
    before = model_fingerprint(model)
    with pytest.raises(fxtap.TraceFailedError) as info:
        fxtap.tap(model, ["stem"], mode="fx")
    assert info.value.module == "blocks.1", str(info.value)
    after = model_fingerprint(model)
    assert after["hooks"] == before["hooks"] and after["modules"] == before["modules"]


def test_hazard_in_a_block_outside_the_request_keeps_the_rest_fx() -> None:
    tapped = _tap(_Stack(NoGrad()), ["stem", "head"])
    assert tapped.mode == "fx"  # the opaque block is one step of the graph; both names come from it
    assert "changes the grad mode" in str(tapped.caught[0].message)  # type: ignore[attr-defined]


def _saved_count(model: nn.Module, run: Callable[[torch.Tensor], Any]) -> int:
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    x = torch.randn(8, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(x)
    loss = out["output"].sum() if isinstance(out, dict) else out.sum()
    loss.backward()
    return count


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_memory_saving_survives_training_through_a_tapped(reentrant: bool) -> None:
    torch.manual_seed(0)
    model = _Stack(Checkpointed(reentrant)).train()
    plain = _Stack(_Plain()).train()
    plain.blocks[1] = Checkpointed(reentrant)
    block = plain.blocks[1]
    block.forward = lambda x: x + block.inner(block.fc(x))  # the same block without checkpointing
    tapped = _tap(model, ["stem", "head"])
    eager = _saved_count(model, model)
    through = _saved_count(model, tapped)
    unsaved = _saved_count(plain, plain)
    assert through == eager < unsaved


def test_root_hooks_run_around_the_model_as_eagerly() -> None:
    torch.manual_seed(0)
    model = _Stack(_Plain())
    model.register_forward_pre_hook(_pre_scale)
    model.register_forward_hook(lambda m, i, o: o * 10)
    twin = copy.deepcopy(model)
    tapped = _tap(model, ["stem", "blocks.1.add", "head"])
    assert "registered on the model itself" in str(tapped.caught[0].message)  # type: ignore[attr-defined]
    x = torch.randn(2, 4)
    out = tapped(x)
    truth, output = _eager(twin, x)
    assert_same(out["stem"], truth["stem"])
    assert_same(out["head"], truth["head"])
    assert_same(out["output"], output.detach())
    assert tapped.paths["blocks.1.add"] == "fx"  # the children are still traced, on their own


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_global_hooks_are_not_bypassed(kind: str) -> None:
    from torch.nn.modules import module as registry

    calls: list[str] = []
    if kind == "forward":
        handle = registry.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    else:
        handle = registry.register_module_forward_pre_hook(lambda m, i: calls.append(type(m).__name__))
    try:
        model = _Stack(_Plain())
        tapped = _tap(model, ["stem", "blocks.1.fc"])
        assert "global module hooks" in str(tapped.caught[0].message)  # type: ignore[attr-defined]
        x = torch.randn(2, 4)
        calls.clear()
        model(x)
        eager_calls = sorted(calls)
        calls.clear()
        tapped(x)
        assert sorted(c for c in calls if c != "Tapped") == eager_calls
    finally:
        handle.remove()


def test_full_backward_hook_on_a_traced_through_block_fires() -> None:
    model = _Stack(_Plain())
    fired: list[int] = []
    model.blocks[1].register_full_backward_hook(lambda m, gi, go: fired.append(1))
    tapped = _tap(model, ["stem", "head"])
    tapped(torch.randn(2, 4, requires_grad=True))["output"].sum().backward()
    assert fired == [1]


def test_hook_added_after_tap_is_seen_on_the_next_call() -> None:
    torch.manual_seed(0)
    model = _Stack(_Plain())
    tapped = _tap(model, ["blocks.1", "head"])
    x = torch.randn(2, 4)
    before = tapped(x)["head"]
    handle = model.blocks[1].register_forward_hook(_steer)
    with pytest.warns(fxtap.FallbackWarning, match="forward hook registered on 'blocks.1'"):
        steered = tapped(x)
    assert_same(steered["head"], model(x))
    assert not torch.equal(steered["head"], before)
    handle.remove()
    assert_same(tapped(x)["head"], before)  # the block stays opaque, which is still exact


def test_fxtap_hooks_are_never_left_behind_on_hazards() -> None:
    model = CONTEXTS["forward_hook"]()
    before = model_fingerprint(model)
    tapped = _tap(model, NAMES, mode="auto")
    tapped(torch.randn(2, 4))
    assert model_fingerprint(model)["hooks"] == before["hooks"]


def test_compare_flags_nothing_and_uses_eager_truth_inside_opaque_blocks() -> None:
    torch.manual_seed(0)
    model = CONTEXTS["forward_hook"]()
    result = fxtap.compare(model, ["blocks.1", "blocks.1.fc", "head", "blocks.2.add"], torch.randn(2, 4))
    assert result.ok, str(result)
    assert result["blocks.1.fc"].fx is False  # captured by a hook inside the opaque block


_CALLS = [0]  # Python state outside the model, which no detection can see


class GlobalCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS[0] += 1
        return torch.relu(self.fc(x)) * _CALLS[0]


def test_compare_does_not_take_a_graph_that_differs_from_eager_as_the_truth() -> None:
    model = GlobalCounter()
    result = fxtap.compare(model, ["fc", "relu", "mul"], torch.randn(2, 4))
    assert result["fc"].ok  # a module call: its truth is a hook in the eager model
    assert not result["mul"].ok and result["mul"].vs_truth == float("inf")  # the graph baked the counter
    assert not result.ok


class Swallows(_Plain):
    """Catches every exception around a grad-mode change (fxtap's detection must still hold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad():
                y = self.fc(x)
        except Exception:  # noqa: BLE001 - the point of this model
            y = self.fc(x)
        return x + y


def test_hazard_swallowed_by_the_models_own_except_is_still_found() -> None:
    with pytest.raises(fxtap.TraceFailedError) as info:
        fxtap.tap(_Stack(Swallows()), ["stem"], mode="fx")
    assert info.value.module == "blocks.1"
    assert "changes the grad mode" in info.value.reason
