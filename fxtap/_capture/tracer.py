"""The tracer: torch.fx's symbolic tracer, plus a tap name for every value it records.

``_TapTracer`` overrides only the tracer's hooks (``call_module``, ``create_proxy``, ``proxy``,
``getattr``, ``create_arg``): it names every node by the rules of ``_names``, records each module
call's return value as a ``TapPoint``, and reports what a graph cannot hold (``_hazards``). Its
Proxies record in-place operators as in-place ops and treat a type check of a traced value as a
hazard. ``fx.trace`` runs it; ``Hints`` are the user's tracer hints.
"""

from __future__ import annotations

import inspect
import math
import operator
import sys
import threading
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.fx.node import Argument

from .._values import holds_tensor
from . import hazards as _hazards
from . import names as _names
from .codegen import as_argument
from .model import attribute_paths
from .prune import from_torch_nn, own_class

__all__ = ["NO_HINTS", "Hints", "TapPoint", "is_standard_leaf"]


class _OwnThreadIds(set[int]):
    """The ids of the functions torch.fx wraps automatically (``math.sqrt``), as seen by the
    tracing thread only: another thread whose module call passes the patched ``__call__`` meanwhile
    must not have the functions of its module wrapped (a wrapper torch.fx might never remove)."""

    def __init__(self, ids: set[int], thread: int) -> None:
        super().__init__(ids)
        self.thread = thread

    def __contains__(self, item: object) -> bool:
        return threading.get_ident() == self.thread and super().__contains__(item)


class Hints(NamedTuple):
    """Tracer hints, as torchvision's ``tracer_kwargs`` gives them: module classes FX keeps as one
    step (``leaf_modules``), and plain Python functions it records as one call instead of running
    them on proxies (``autowrap_functions``, the same as ``torch.fx.wrap``)."""

    leaf_modules: tuple[type[nn.Module], ...] = ()
    autowrap_functions: tuple[Any, ...] = ()

    @classmethod
    def checked(cls, leaf_modules: Any, autowrap_functions: Any) -> Hints:
        """The hints from the user's arguments (``None`` or sequences), checked.

        Raises:
            TypeError: a leaf is not an ``nn.Module`` class, or a function is not a plain
                Python function.
        """
        leaves = tuple(leaf_modules or ())
        functions = tuple(autowrap_functions or ())
        for leaf in leaves:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise TypeError(
                    f"leaf_modules lists nn.Module classes (as torchvision's tracer_kwargs does), not {leaf!r} "
                    f"({type(leaf).__name__}): to keep one module as one step, list its class, type(module)."
                )
        for function in functions:
            if not inspect.isfunction(function):
                raise TypeError(
                    f"autowrap_functions lists plain Python functions defined at module level, not {function!r} "
                    f"({type(function).__name__}): FX records a call of such a function where the forward's module "
                    "refers to it by name (see docs/names.md)."
                )
        return cls(leaves, functions)


NO_HINTS = Hints()  # the default: FX's own leaves and wrapped functions only


class TapPoint(NamedTuple):
    """One tappable value of a traced model."""

    name: str
    kind: str  # "module", "op", "input" or "attribute"
    value: Argument  # a Node, or a tuple/list/dict of Nodes for a module returning a container
    module_type: str  # the module's class for "module", else the class whose forward ran the op
    scope: str  # path of the module whose forward produced the value ("" = the root)
    moment: fx.Node  # the value is taken right after this node ran (a module's output: its last node)


class _Proxy(fx.Proxy):
    """A Proxy that records in-place operators (``x += y``, ``x[i] = v``) as in-place ops.

    Plain FX proxies have no ``__iadd__``, so Python rebinds ``x`` to an out-of-place ``x + y``
    and any other reference to the old ``x`` misses the update that eager mode makes.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # read by isinstance(p, C) when C is not a Proxy class
        return _hazards.type_read(self, sys._getframe(1))

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _Attribute(self, k)


class _Attribute(fx.proxy.Attribute, _Proxy):
    """``p.attr`` of a traced value: its type is checked as the value's is."""


def _inplace_dunder(op: Any) -> Any:
    def method(self: _Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _op in ["iadd", "iand", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor"]:
    setattr(_Proxy, f"__{_op}__", _inplace_dunder(getattr(operator, _op)))


def is_standard_leaf(module: nn.Module) -> bool:
    """torch.fx's own leaf rule: modules from ``torch.nn`` itself, except the containers.

    A parametrized module is judged by the class it was made from (``prune.own_class``): a
    parametrized user block is still the user's code, traced through."""
    return from_torch_nn(module) and not issubclass(own_class(module), _CONTAINERS)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _TapTracer(fx.Tracer):
    """The tracer: torch.fx's symbolic tracer, plus a name for every value it records.

    It overrides only the tracer's hooks. ``call_module`` traces through a module (or records
    a leaf's call), names the module's return value by its path and call count, and records the
    node after which that value is final (``TapPoint.moment``); ``create_proxy`` names each
    functional op by the scope whose forward ran it. Untraceable code raises out of the trace
    with ``failure`` set to the innermost module whose forward raised, so ``analyse`` can make
    exactly that module a leaf.

    It never sees another thread's calls. While it traces, torch.fx's patched
    ``nn.Module.__call__`` and ``__getattr__`` call this tracer's ``call_module`` and ``getattr``
    for *every* thread. Calls from a thread other than the tracing one go straight to the
    module's own ``__call__`` (hooks and all) and attribute reads return the attribute: that
    thread runs exactly as if nothing were traced.
    """

    def __init__(self, root: nn.Module, leaves: frozenset[nn.Module], hints: Hints = NO_HINTS) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=hints.autowrap_functions)
        self._leaf_types = hints.leaf_modules
        self.thread = threading.get_ident()
        ids = getattr(self, "_autowrap_function_ids", None)
        if isinstance(ids, set):
            self._autowrap_function_ids = _OwnThreadIds(ids, self.thread)
        self._leaves = leaves
        # the path of every parameter and buffer by identity (torch.fx searches them one by one
        # on every attribute read: quadratic in the number of buffers read in traced code)
        self._state_paths = {id(t): n for n, t in [*root.named_buffers(), *root.named_parameters()]}
        self.namer = _names.Namer(*attribute_paths(root))
        self.points: dict[str, TapPoint] = {}
        self.failure: tuple[str, str] | None = None  # innermost (path, type) whose forward raised
        self._calls: dict[str, int] = {}
        self.inlined: dict[str, int] = {}
        self.naming: list[tuple[str, str, str]] = []  # what _names.Replay needs to name later calls
        self._scopes: list[tuple[str, str]] = [("", type(root).__name__)]
        self.reads_grad_mode = False  # set by _hazards.watching
        self.typed_leaves: set[str] = set()  # leaf modules whose output a kept type check relied on (_hazards.type_read)
        self.hazard: tuple[str, str, _hazards.Hazard] | None = None  # the first hazard met: (path, type, error)

    def found(self, hazard: _hazards.Hazard) -> None:
        """Called by _hazards where traced code does what a graph cannot hold."""
        if self.hazard is None:
            self.hazard = (*self._scopes[-1], hazard)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._leaves or isinstance(m, self._leaf_types) or is_standard_leaf(m)

    def create_arg(self, a: Any) -> Argument:
        """Also an object FX cannot write as a literal (torchvision's ``LevelMapper``, which
        ``MultiScaleRoIAlign`` caches on itself at its first call) when it is an attribute of one
        of the model's modules: a ``get_attr`` of that path, as FX does for parameters."""
        if isinstance(a, fx.Proxy):  # the most common argument, before torch.fx's isinstance checks
            return a.node
        try:
            with _hazards.tracer_internals():  # torch.fx stores tensor constants on the root: not the model's write
                return super().create_arg(a)
        except NotImplementedError:
            path = next(
                (_names.join(prefix, key) for prefix, module in self.root.named_modules() for key, value in vars(module).items() if value is a and not key.startswith("_")),
                None,
            )
            if path is None:
                raise
            return self.create_node("get_attr", path, (), {})

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val  # another thread's attribute read while torch.fx's patch is installed
        # Buffers are model state, read when the graph runs, as parameters are: otherwise math on
        # buffers alone (``w * (rv + eps).rsqrt()``) runs once while tracing and is stored as a
        # constant, stale after ``load_state_dict``, and an in-place write into a buffer changes
        # the real one while tracing. Every read of one tensor is one get_attr node.
        path = self._state_paths.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if path is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if path not in parameter_proxy_cache:
            parameter_proxy_cache[path] = self.create_proxy("get_attr", path, (), {})
        return parameter_proxy_cache[path]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)  # torch.fx's ``forward`` here is the module's own __call__
        path = self.path_of_module(m)
        index = self._calls.get(path, 0)
        self._calls[path] = index + 1
        name = self.namer.module_call(path, index)
        self.naming.append(("module", path, name))
        kind = type(m).__name__
        if self.is_leaf_module(m, path):
            proxy = super().call_module(m, forward, args, kwargs)
            self._record(name, "module", proxy, kind, self._scopes[-1][0])
            return proxy
        self._scopes.append((path, kind))
        self.inlined[path] = self.inlined.get(path, 0) + 1
        try:
            hooks = _hazards.user_hooks(m)
            if hooks:
                raise _hazards.Hazard(f"{hooks} registered on {path!r} (fxtap cannot trace through user hooks)")
            state = _containers(m)
            # m.forward, not the hook-running __call__: user hooks must never see proxies.
            out = super().call_module(m, m.forward, args, kwargs)
            changed = [key for key, (value, before) in state.items() if _changed(value, before)]
            if changed:
                raise _hazards.Hazard(
                    f"the forward of {path!r} changes the contents of self.{changed[0]} (Python-side state that a graph cannot record)"
                )
        except Exception:
            if self.failure is None:
                self.failure = (path, kind)
            raise
        finally:
            self._scopes.pop()
        self._record(name, "module", out, kind, path, moment=next(iter(reversed(self.graph.nodes))))
        return out

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
        if kind == "placeholder" and args and holds_tensor(args):
            args = ()  # FX cannot write a tensor default in code; callers pass it (call_spec.graph_args)
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        scope, scope_type = self._scopes[-1]
        proxy.node.meta["fxtap_scope"] = scope
        if kind == "placeholder":
            name = self.namer.node(str(target).lstrip("*"))
            self.naming.append(("input", str(target), name))
            self._record(name, "input", proxy, scope_type, scope)
        elif kind == "get_attr":
            name = self.namer.attribute(str(target))
            self.naming.append(("attribute", str(target), name))
            self._record(name, "attribute", proxy, scope_type, scope)
        elif kind in ("call_function", "call_method"):
            raw = target if isinstance(target, str) else getattr(target, "__name__", "op")
            base = _names.join(scope, _names.op_base_name(raw))
            name = self.namer.node(base)
            self.naming.append(("node", base, name))
            self._record(name, "op", proxy, scope_type, scope)
        return proxy

    def _record(self, name: str, kind: str, value: Any, module_type: str, scope: str, moment: fx.Node | None = None) -> None:
        nodes = as_argument(value)
        found: list[fx.Node] = []
        fx.node.map_arg(nodes, found.append)
        if found:  # a module returning no tensor-derived value has nothing to tap
            last = found[-1] if moment is None else moment  # one node, unless a module returned a container
            self.points[name] = TapPoint(name, kind, nodes, module_type, scope, last)


def _containers(module: nn.Module) -> dict[str, tuple[Any, list[Any]]]:
    """The lists, dicts and sets a module holds, with their items (a cache its forward may fill)."""
    return {
        key: (value, list(value.items()) if isinstance(value, dict) else list(value))
        for key, value in module.__dict__.items()
        if type(value) in (list, dict, set) and key not in _STATE_REGISTRIES
    }


# buffers and parameters rebound during a trace are checked by state.rebinding_checked, which
# lets an in-place write assigned back (``self.calls += 1``) trace
_STATE_REGISTRIES = frozenset({"_buffers", "_parameters"})


def _changed(container: Any, before: list[Any]) -> bool:
    now = list(container.items()) if isinstance(container, dict) else list(container)
    if len(now) != len(before):
        return True
    pairs = [(a, b) for x, y in zip(now, before) for a, b in (zip(x, y) if isinstance(x, tuple) and isinstance(y, tuple) else [(x, y)])]
    return any(a is not b for a, b in pairs)
