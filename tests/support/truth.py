"""The reference the tests compare against: clones taken inside plain forward hooks, by hand.

Deliberately independent of fxtap: it uses ``register_forward_hook`` directly and names the
k-th call of a module ``path`` / ``path_k`` (no module in these tests has a ``_<digits>`` name
that collides), so a bug in fxtap's naming or capture cannot hide in the reference.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
import dataclasses
from typing import Any

import torch
from torch import nn

import fxtap


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    return value


def hook_truth(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every module call's output, cloned at the moment it ran, keyed path / path_1 / ..."""
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = []

    def make(path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            out[path if k == 0 else f"{path}_{k}"] = _clone(output)

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(make(path)))
    try:
        # no torch.no_grad(): some kernels (MultiheadAttention's fast path) differ without grad
        out["output"] = _clone(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out


def assert_same(actual: Any, expected: Any, *, exact: bool = True) -> None:
    """Equal values (exactly by default) in equal structures."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), type(actual)
        if exact:
            torch.testing.assert_close(actual.detach(), expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-5, atol=1e-5)
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        if hasattr(expected, "_fields"):  # a namedtuple stays one
            assert type(actual) is type(expected), type(actual)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e, exact=exact)
        return
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key], exact=exact)
        return
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), type(actual)
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), exact=exact)
        return
    assert actual == expected


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What must not change: parameters and buffers (object, storage, values), modules, modes, hooks."""
    return {
        "tensors": {
            name: (id(t), t.data_ptr(), t.detach().clone())
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
        },
        "modules": {name: id(m) for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        },
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = model_fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert list(after["tensors"]) == list(before["tensors"])
    for name, (ident, ptr, value) in before["tensors"].items():
        a_ident, a_ptr, a_value = after["tensors"][name]
        assert (a_ident, a_ptr) == (ident, ptr), name
        torch.testing.assert_close(a_value, value, rtol=0, atol=0)


@contextlib.contextmanager
def quiet_fallbacks() -> Iterator[None]:
    """Silence ``FallbackWarning`` for the block (pytest turns it into an error everywhere else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        yield
