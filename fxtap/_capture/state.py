"""Model state that tracing must not bake in: buffer rebinding and random calls without tensors.

**Random calls.** torch.fx records a call only when a proxy is among its arguments: ``torch.randn(3)``
or ``torch.rand(8, 8)`` would run once while tracing (drawing from the RNG then) and become a
constant, the same "random" tensor on every call. ``random_calls_recorded`` records every torch
call that draws from the RNG (``effects.may_draw``) as a graph node, whatever its arguments.

**Buffer rebinding.** A graph reads buffers and parameters when it runs, and can write into them in place
(``self.calls += 1``, ``self.cache.index_copy_(...)``). It cannot make another tensor the
buffer: ``self.avg = 0.9 * self.avg + x`` in eager mode replaces the object registered under
``avg``. Tracing runs that assignment with a proxy (``model.preserved`` undoes it afterwards), so
the graph would silently drop the update; ``rebinding_checked`` finds it and fails the trace of
the module that did it, which then runs eagerly as an opaque leaf. Assigning back the result of
an in-place write into the same buffer (``self.calls += 1``) is what eager mode does too: allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .._errors import TraceFailedError
from . import effects as _effects

__all__ = ["random_calls_recorded", "rebinding_checked"]

_REGISTRIES = ("_buffers", "_parameters")


@contextmanager
def rebinding_checked(model: nn.Module) -> Iterator[None]:
    """Raise ``TraceFailedError`` (naming the module) when the block rebinds a buffer or parameter."""
    modules = list(model.named_modules(remove_duplicate=False))
    before = [{name: id(value) for r in _REGISTRIES for name, value in getattr(m, r, {}).items()} for _, m in modules]
    yield
    for (path, module), ids in zip(modules, before):
        now = {name: id(value) for r in _REGISTRIES for name, value in getattr(module, r, {}).items()}
        changed = [name for name in ids.keys() | now.keys() if ids.get(name) != now.get(name) and not _written_back(model, module, name)]
        if changed:
            kind = "parameter" if changed[0] in getattr(module, "_parameters", {}) else "buffer"
            reason = (
                f"forward assigns a new tensor to {kind} {changed[0]!r} (a graph can update a buffer only in place: "
                "use .copy_() to trace it)"
            )
            where = f"submodule {path!r} ({type(module).__name__})" if path else f"the forward of {type(module).__name__} itself"
            raise TraceFailedError(f"torch.fx cannot trace {where}: {reason}", module=path, module_type=type(module).__name__, reason=reason)


def _written_back(model: nn.Module, module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` now holds a proxy of an in-place write into that same buffer:
    ``self.calls += 1`` rebinds ``calls`` to the tensor it already is, as in eager mode."""
    value = getattr(module, "_buffers", {}).get(name, getattr(module, "_parameters", {}).get(name))
    if not isinstance(value, fx.Proxy) or value.node.op not in ("call_function", "call_method"):
        return False
    return _is_buffer(model, value.node, module, name)


def _is_buffer(model: nn.Module, node: fx.Node, module: nn.Module, name: str) -> bool:
    """Whether ``node`` is the read of ``module.<name>``, or an in-place write into it (the second
    ``self.calls += 1`` in one forward writes into the first one's result)."""
    if node.op == "get_attr":
        prefix, _, attribute = str(node.target).rpartition(".")
        return attribute == name and model.get_submodule(prefix) is module
    if node.op not in ("call_function", "call_method"):
        return False
    return any(_is_buffer(model, written, module, name) for written in _effects.written(node))


class _RandomCalls(TorchFunctionMode):
    def __init__(self, tracer: fx.Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _effects.may_draw(func) and not _holds_proxy((args, kwargs)):
            return self.tracer.create_proxy("call_function", func, args, kwargs)
        return func(*args, **kwargs)


def _holds_proxy(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, fx.Proxy)
        return v

    fx.node.map_aggregate(value, visit)
    return found


@contextmanager
def random_calls_recorded(tracer: fx.Tracer) -> Iterator[None]:
    """While tracing, record random torch calls that have no proxy argument as graph nodes."""
    with _RandomCalls(tracer):
        yield
