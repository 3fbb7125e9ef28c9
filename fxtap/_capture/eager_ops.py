"""Names for the functional ops of code that runs eagerly: the own ops of a module FX cannot trace.

When a module's ``forward`` cannot be traced (the root of every Hugging Face model), it runs
eagerly and no graph names its own ops (its mask building, say). ``naming`` names them
*while they run*: a ``TorchFunctionMode``, active for the tapped call, sees every torch call;
forward pre-hooks and hooks (fxtap's own, for that call only) keep the stack of running modules,
so an op belongs to the module whose own code (or a plain function it calls) made it, as in FX.

The names are FX's (``_names.Namer``, scope + op, ``_k`` in call order), and a name is only given
where FX, tracing that code, would give it to the same value (tests/capture/test_eager_ops.py and
the property over random models check it on every model FX traces). FX records a call only when a traced value (an
input, a parameter or buffer, a module output, or an op's result) is among its arguments, and it
records the Python operators it sees on traced *non-tensors* too (``x.shape[1] + 1``: a getitem
and an add), which eager code does not show. So each module call keeps which tensors are traced;
a call of constants only is no node (as in FX); and from the first non-tensor value a traced op
returns (a size, a dtype, a tuple), the names that FX might also give to ops on such values
(Python operators, ``getattr``, ``math`` and ``torch.fx.wrap`` functions, methods of ints and
tuples) are not given in that scope any more, nor the name of a call whose arguments might be
such values. A name that could shift is absent, never wrong. ``x / y`` and ``x.div(y)`` reach
torch as the same function: the instruction that made the call tells them apart (``truediv``
and ``div``, ``op_spelling``).

Only requested names cost anything: no mode and no hooks when no such name is requested.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .._values import copy_value, detach_value
from . import names as _names
from . import op_spelling as _spelling
from .effects import may_draw
from .hazards import mark_fxtap_hook
from .model import attribute_paths, buffer_values_kept
from .tracer import NO_HINTS, Hints, is_standard_leaf

__all__ = ["EagerOps", "Produced", "defer", "deferrable", "list_ops", "missing_message", "naming", "op_names", "reason"]


@dataclass
class EagerOps:
    """Requested op names of eagerly running scopes, checked by the call that produces them.

    Attributes:
        wanted: tap name -> the path of the module whose own code runs the op ("" = the root).
        leaves: module paths FX keeps as one step (their non-tensor outputs are traced values).
        wrapped: the user's ``autowrap_functions`` (FX records each call as one node).
    """

    wanted: dict[str, str] = field(default_factory=dict)
    leaves: frozenset[str] = frozenset()
    wrapped: tuple[Any, ...] = ()


# -- which names may be op names of an eager scope ---------------------------------------------


def deferrable(name: str, scopes: Iterable[str]) -> str | None:
    """The eager scope that ``name`` could be an op of (``scope.op``, ``op_k``, ``op_fn``), or
    ``None``: the name is checked by the call, since no graph lists these ops before it runs."""
    scope, _, leaf = name.rpartition(".")
    if scope not in set(scopes):
        return None
    split = _names.split_suffix(leaf)
    base = split[0] if split is not None else leaf
    base = base.removesuffix("_fn")
    return scope if base in _spelling.op_words() else None


def defer(model: nn.Module, unknown: list[str], request: Iterable[str], fallbacks: dict[str, tuple[str, str]], leaf_types: tuple[type, ...] = (), wrapped: tuple[Any, ...] = ()) -> tuple[EagerOps, list[str]]:
    """Split names no graph or hook holds into op names of eagerly running code (checked by the
    call) and names that do not exist. ``fallbacks``: the code that runs eagerly (path -> reason)."""
    asked = set(request)
    wanted = {name: scope for name in unknown if name in asked and (scope := deferrable(name, fallbacks)) is not None}
    leaves = {path for path, m in model.named_modules() if path in fallbacks or (leaf_types and isinstance(m, leaf_types))}
    return EagerOps(wanted, frozenset(leaves), wrapped), [name for name in unknown if name not in wanted]


def reason(model: nn.Module, scope: str) -> str:
    """Why an op name of ``scope`` is captured as the eager code runs (for ``Tapped.report()``)."""
    where = f"{scope!r} ({type(model.get_submodule(scope)).__name__})" if scope else type(model).__name__
    return f"an op of the eagerly running forward of {where}, named as it runs (docs/names.md)"


# -- naming during a call ----------------------------------------------------------------------

_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _Scope:
    """What one eager scope produced, over every call of it in one tapped call."""

    path: str
    module_type: str
    produced: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # base -> why no name is given
    dead: str = ""  # why no name at all is given from now on
    kinds: set[str] = field(default_factory=set)  # kinds of traced non-tensors seen: FX may record ops on them that eager code hides
    loose: bool = False  # a traced tensor was iterated: any tensor may be a value FX traces

    def refuse(self, base: str, why: str) -> None:
        self.refused.setdefault(base, why)

    def saw(self, value: Any, what: str) -> None:
        """A traced value FX would hold as a proxy and eager code holds as a plain value."""
        leaves = [v for v in pytree.tree_leaves(value) if not isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else [value]
        kinds = {_spelling.kind(v) for v in leaves} | ({"number"} if isinstance(value, (tuple, list)) else set())  # a tuple proxy: getitem
        for kind in kinds - self.kinds:
            self.kinds.add(kind)
            for word in _spelling.shape_words(kind):
                self.refuse(word, f"after {what}, FX would also count Python operations on that value, which eager code hides")

    def uncertain(self, values: list[Any]) -> bool:
        """Whether FX might hold one of these non-tensor arguments as a traced value."""
        return any(_spelling.kind(v) in self.kinds for v in values)


class _Frame:
    """One running module call: its path, its scope (``None``: its ops are not named), and which
    of the tensors it sees are traced values (or may be)."""

    def __init__(self, module: nn.Module, path: str, scope: _Scope | None, caller: FrameType | None) -> None:
        self.module, self.path, self.scope, self.caller = module, path, scope, caller
        self.traced: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.unknown: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


class _Naming(TorchFunctionMode):
    """Names the ops of the scopes in ``scopes`` as they run, and keeps the wanted ones."""

    def __init__(self, model: nn.Module, scopes: dict[str, _Scope], wanted: dict[str, str], ops: EagerOps, keep: Any) -> None:
        super().__init__()
        self.scopes, self.wanted, self.keep = scopes, wanted, keep
        self.leaves = ops.leaves
        self.namer = _names.Namer(*attribute_paths(model))
        self.state: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary(
            {id(t): t for t in [*model.parameters(), *model.buffers()]}
        )
        self.wrapped = _spelling.fx_wrapped(ops.wrapped)
        self.stack: list[_Frame] = []
        self.order: list[str] = []  # every name produced, in call order

    # module calls ------------------------------------------------------------------------------
    def enter(self, module: nn.Module, path: str, args: Any, kwargs: Any) -> None:
        scope = self.scopes.get(path)
        frame = _Frame(module, path, scope, sys._getframe(2))  # nn.Module's _call_impl: where this call's code starts
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                frame.traced[id(leaf)] = leaf  # an input: a placeholder of the module's graph
            elif scope is not None and not isinstance(leaf, _SIMPLE) and not scope.dead:
                scope.dead = f"it takes a {type(leaf).__name__} argument, which a graph takes as one input and whose methods it records as one call each"
        self.stack.append(frame)

    def leave(self, module: nn.Module, output: Any) -> None:
        if not any(f.module is module for f in self.stack):
            return
        frame = self.stack.pop()
        while frame.module is not module:  # calls that raised and were caught by the model's code
            frame = self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        if parent is None or parent.scope is None:
            return
        leaves = pytree.tree_leaves(output)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parent.traced[id(leaf)] = leaf
        opaque = frame.path in self.leaves or is_standard_leaf(module)
        if opaque and not isinstance(output, torch.Tensor):
            parent.scope.saw(output if isinstance(output, (tuple, list)) else (output,), f"{frame.path!r} returned a {type(output).__name__}")
        for leaf in leaves:
            if not isinstance(leaf, (torch.Tensor, type(None))):
                parent.scope.saw(leaf, f"{frame.path!r} returned a {type(leaf).__name__}")

    # torch calls -------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        frame = self.stack[-1] if self.stack else None
        if frame is None or frame.scope is None:
            return func(*args, **kwargs)
        caller = sys._getframe(1)
        kind, base = _spelling.spelling(func, caller)
        wrapped = self._wrapped_by(caller, frame.caller)
        out = func(*args, **kwargs)
        self._record(frame, func, kind, base, wrapped, (args, kwargs), out)
        return out

    def _wrapped_by(self, caller: FrameType | None, stop: FrameType | None) -> str:
        """The function FX records as one call that this op runs inside ("" when none)."""
        found = ""
        while caller is not None and caller is not stop:
            found = self.wrapped.get(caller.f_code, found)
            caller = caller.f_back
        return found

    def _record(self, frame: _Frame, func: Any, kind: str, base: str, wrapped: str, arguments: Any, out: Any) -> None:
        scope = frame.scope
        assert scope is not None
        tensors = [t for t in pytree.tree_leaves(arguments) if isinstance(t, torch.Tensor)]
        traced = any(self._is_traced(frame, t) for t in tensors)
        if wrapped:  # FX records the wrapped function as one node (where it patched the caller's globals), else its ops
            why = f"FX records {wrapped}() as one call where it wraps it, which eager code runs op by op"
            scope.refuse(_names.op_base_name(wrapped), why)
            scope.refuse(base, why)
            scope.saw(0, f"the call of {wrapped}()")
            self._mark(frame, arguments, out, traced)
            return
        if kind == "protocol":
            # bool(), int(), len() of a traced tensor: FX cannot trace them; the value is taken as a
            # constant, as a trace with concrete arguments would. Iterating yields tensors unseen here.
            scope.loose = scope.loose or (base == "iter" and traced)
            if base == "iter" and traced:
                scope.refuse("getitem", "a traced tensor was iterated, which FX records as getitem calls that eager code hides")
            return
        if not traced and not may_draw(func):
            others = [v for v in pytree.tree_leaves(arguments) if not isinstance(v, (torch.Tensor, type(None)))]
            if any(id(t) in frame.unknown for t in tensors) or (scope.loose and tensors) or scope.uncertain(others):
                scope.refuse(base, "some call of it takes values that FX might trace (sizes) and eager code cannot tell")
                self._mark(frame, arguments, out, False)
                if not isinstance(out, (torch.Tensor, type(None))):
                    scope.saw(out, f"{base}() returned a {type(out).__name__}")
            return  # only constants: no node in FX either
        self._mark(frame, arguments, out, True)
        if not isinstance(out, (torch.Tensor, type(None))):
            scope.saw(out, f"{base}() returned a {type(out).__name__}")
        if kind == "getter" or scope.dead or base in scope.refused:
            return
        name = self.namer.node(_names.join(frame.path, base))
        scope.produced.append(name)
        self.order.append(name)
        if name in self.wanted:
            value = arguments[0][0] if base == "setitem" else out  # ``x[i] = v`` is x after the write, as in a graph
            self.keep(name, copy_value(value))  # a later in-place write must not change the value taken

    def _is_traced(self, frame: _Frame, tensor: torch.Tensor) -> bool:
        key = id(tensor)
        return frame.traced.get(key) is tensor or self.state.get(key) is tensor

    def _mark(self, frame: _Frame, arguments: Any, out: Any, traced: bool) -> None:
        inputs = {id(t) for t in pytree.tree_leaves(arguments) if isinstance(t, torch.Tensor)}
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            if id(leaf) in inputs:  # an in-place op returned its argument: FX's result is another value
                if not self._is_traced(frame, leaf):
                    frame.unknown[id(leaf)] = leaf
            elif traced:
                frame.traced[id(leaf)] = leaf
            else:
                frame.unknown[id(leaf)] = leaf


class Produced(NamedTuple):
    """What a call produced: per scope (its names, and why some are not given), and every name in call order."""

    scopes: dict[str, _Scope]
    order: list[str]


@contextmanager
def naming(model: nn.Module, ops: EagerOps, keep: Any, *, detach: bool = False, scopes: Iterable[str] | None = None) -> Iterator[Produced]:
    """Name the own ops of the scopes of ``ops.wanted`` (or of ``scopes``) during the block;
    ``keep(name, value)`` receives each wanted value. Nothing is installed when no scope is asked for."""
    paths = set(ops.wanted.values()) if scopes is None else set(scopes)
    found = {path: _Scope(path, type(model.get_submodule(path)).__name__) for path in paths}
    if not found:
        yield Produced(found, [])
        return
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):  # no Python hooks: its calls and outputs are unseen
            for scope in found.values():
                if _names.inside(path, scope.path, strict=True):
                    scope.dead = f"it holds the TorchScript module {path!r}, whose calls eager naming cannot follow"
    store = (lambda name, value: keep(name, detach_value(value))) if detach else keep
    mode = _Naming(model, found, ops.wanted, ops, store)
    handles: list[RemovableHandle] = []
    try:
        for path, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            handles.append(module.register_forward_pre_hook(_pre_hook(mode, path), with_kwargs=True))
            handles.append(module.register_forward_hook(_post_hook(mode), always_call=True))
        with mode:
            yield Produced(found, mode.order)
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(mode: _Naming, path: str) -> Any:
    thread = threading.get_ident()

    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        if threading.get_ident() == thread:
            mode.enter(module, path, args, kwargs)

    return mark_fxtap_hook(hook)


def _post_hook(mode: _Naming) -> Any:
    thread = threading.get_ident()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == thread:
            mode.leave(module, output)

    return mark_fxtap_hook(hook)


# -- after the call --------------------------------------------------------------------------------


def missing_message(ops: EagerOps, produced: Produced, captured: Iterable[str], owner: str) -> str:
    """Why requested op names were not produced by this call ("" when all were)."""
    have = set(captured)
    lines = []
    for name, path in ops.wanted.items():
        if name in have:
            continue
        scope = produced.scopes[path]
        where = f"the forward of {path!r} ({scope.module_type})" if path else f"{owner}'s own forward"
        base = _names.split_suffix(name.rpartition(".")[2])
        base_name = (base[0] if base is not None else name.rpartition(".")[2]).removesuffix("_fn")
        why = scope.dead or scope.refused.get(base_name, "")
        listed = ", ".join(map(repr, scope.produced[:40])) + (", ..." if len(scope.produced) > 40 else "")
        lines.append(
            f"no op named {name!r} in {where} in this call (it runs eagerly, so its ops are named as they run)"
            + (f": no {base_name!r} is named there, because {why}." if why else ".")
            + f"\n  The op names it produced: {listed or 'none'}."
        )
    if not lines:
        return ""
    return "\n".join(lines) + "\n  Op names under code FX cannot trace are listed by fxtap.names(model, example_inputs); see docs/names.md."


def op_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, hints: Hints = NO_HINTS) -> list[str]:
    """The op names of code that runs eagerly (an untraceable root, the children opened under
    it, opaque leaves) that the call ``model(*args, **kwargs)`` produces, in call order: the names
    ``tap`` accepts for that call besides those ``describe`` lists. Runs the model once (see ``list_ops``)."""
    from . import regions as _regions  # the placement's view of what runs eagerly
    from .analysis import analyse
    from .call_spec import call_spec

    analysis = analyse(model, mode="auto", concrete_args=dict(call_spec(model, args, kwargs)), hints=hints)
    scopes = dict(analysis.fallbacks)
    if analysis.traced is None:
        scopes = _regions.resolve(model, [], analysis.fallbacks[""], everything=True, hints=hints).fallbacks
    leaves = [path for path, m in model.named_modules() if path in scopes or (hints.leaf_modules and isinstance(m, hints.leaf_modules))]
    return list_ops(model, args, kwargs, scopes, leaves=leaves, wrapped=hints.autowrap_functions)


def list_ops(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], scopes: Iterable[str], *, leaves: Iterable[str] = (), wrapped: tuple[Any, ...] = ()) -> list[str]:
    """Every op name that one call of ``model`` produces in ``scopes``, in call order.

    Runs the model once, in the caller's grad mode; buffers and the RNG are restored afterwards."""
    ops = EagerOps({}, frozenset(leaves), wrapped)
    with buffer_values_kept(model), torch.random.fork_rng(devices=[]), naming(model, ops, lambda name, value: None, scopes=scopes) as produced:
        model(*args, **kwargs)
    return list(produced.order)
