"""The FX path: trace a model with tap names on every node, then rewrite the graph to return taps.

``trace`` runs a ``torch.fx.Tracer`` subclass that overrides only ``call_module``,
``create_proxy`` and ``proxy``: it names every node by the rules of ``_names`` and records each
module call's return value. ``build`` copies the traced graph, keeps only what the requested
values need (``_prune.plan``), snapshots values that a later in-place op would overwrite, and
returns a ``GraphModule`` whose output is a dict.
"""

from __future__ import annotations

import gc
import inspect
import math
import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.fx.node import Argument
from torch.nn.utils import parametrize

from .._errors import TraceFailedError, summary
from .._values import copy_value, detach_value, holds_tensor
from . import guard as _guard
from . import hazards as _hazards
from . import names as _names
from .codegen import (
    CodeError,
    Made,
    as_argument,
    check_code,
    for_torchscript,
    materialize,
    realize,
    split_fixed,
    with_fixed,
)
from .model import attribute_paths, preserved, stand_in
from . import edit as _edit
from .prune import from_torch_nn, plan, written_after
from .state import random_calls_recorded, rebinding_checked

__all__ = ["NO_HINTS", "Hints", "Made", "TapPoint", "Traced", "build", "copy_without_output", "exclusive", "gc_paused", "realize", "trace"]

# torch.fx patches ``nn.Module.__call__``/``__getattr__`` on the class while it traces and puts
# back what it found when it is done: two traces overlapping in time would put back each other's
# patches. So fxtap traces (and builds what it caches) one at a time; the tracer itself sends
# other threads' module calls and attribute reads to the original code (see ``_TapTracer``).
_EXCLUSIVE = threading.RLock()


def exclusive() -> threading.RLock:
    """The lock held while fxtap traces: hold it to build something once, across threads."""
    return _EXCLUSIVE


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


@dataclass
class Traced:
    """A traced model: its graph and every tap point, in graph order."""

    graph: fx.Graph
    root: nn.Module
    points: dict[str, TapPoint] = field(default_factory=dict)
    inlined: dict[str, int] = field(default_factory=dict)  # module path -> calls traced through (no hook fires)
    naming: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, key, name) of every name handed out
    source: nn.Module | None = None  # the user's module that was traced (``root`` is fxtap's stand-in of it)
    reads_grad_mode: bool = False  # the traced code read torch.is_grad_enabled(): the graph holds one branch


class _Proxy(fx.Proxy):
    """A Proxy that records in-place operators (``x += y``, ``x[i] = v``) as in-place ops.

    Plain FX proxies have no ``__iadd__``, so Python rebinds ``x`` to an out-of-place ``x + y``
    and any other reference to the old ``x`` misses the update that eager mode makes.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _inplace_dunder(op: Any) -> Any:
    def method(self: _Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _op in ["iadd", "iand", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor"]:
    setattr(_Proxy, f"__{_op}__", _inplace_dunder(getattr(operator, _op)))


def is_standard_leaf(module: nn.Module) -> bool:
    """torch.fx's own leaf rule: modules from ``torch.nn`` itself, except the containers.

    A parametrized module's class is made in ``torch.nn.utils.parametrize``: judge the class
    it was made from (a parametrized user block is still the user's code, traced through)."""
    if parametrize.is_parametrized(module):
        made_from = type(module).__bases__[0]
        return made_from.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(made_from, _CONTAINERS)
    return from_torch_nn(module) and not isinstance(module, _CONTAINERS)


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


def _root_hazard(model: nn.Module) -> str:
    """Why the root's own forward must run eagerly whatever its code: hooks that only ``__call__`` runs."""
    found = _hazards.global_hooks()
    if found:
        return f"global module hooks are registered ({found}; fxtap cannot trace through user hooks)"
    if getattr(type(model), "_fxtap_called", False):
        return ""  # a submodule traced on its own: its own __call__ runs its hooks around the graph
    hooks = _hazards.user_hooks(model)
    return f"{hooks} registered on the model itself (fxtap cannot trace through user hooks)" if hooks else ""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a graph is traced or built.

    Both allocate a few objects per node, and every full collection they trigger scans all live
    objects, the model's and the graph's: on a 2,000-block model that doubled the build time
    (the build grew faster than the model). The collector runs again afterwards as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def trace(
    model: nn.Module,
    *,
    leaves: frozenset[nn.Module] = frozenset(),
    concrete_args: dict[str, Any] | None = None,
    hints: Hints = NO_HINTS,
) -> Traced:
    """Trace ``model`` and name every node.

    Raises:
        TraceFailedError: tracing failed; ``.module`` names the innermost submodule whose
            ``forward`` raised ("" when it is the root's own code).
    """
    hazard = _root_hazard(model)
    if hazard:
        raise TraceFailedError(
            f"torch.fx cannot trace the forward of {type(model).__name__} itself: {hazard}",
            module="",
            module_type=type(model).__name__,
            reason=hazard,
        )
    concrete_args, fixed = split_fixed(concrete_args)
    root = stand_in(model, with_fixed(model, fixed) if fixed else None)
    tracer = _TapTracer(root, leaves, hints)
    try:
        with (
            _EXCLUSIVE,
            preserved(model),
            gc_paused(),
            rebinding_checked(model),
            random_calls_recorded(tracer),
            _hazards.watching(tracer),
        ):
            graph = tracer.trace(root, concrete_args=concrete_args)
            check_code(graph, root)
    except TraceFailedError:
        raise
    except CodeError as error:
        raise TraceFailedError(str(error), module=error.path, module_type=error.kind, reason=error.reason) from error.__cause__
    except Exception as error:
        path, kind = tracer.failure or ("", type(model).__name__)
        reason = str(error) if isinstance(error, _hazards.Hazard) else summary(error)
        where = f"submodule {path!r} ({kind})" if path else f"the forward of {kind} itself"
        raise TraceFailedError(
            f"torch.fx cannot trace {where}: {reason}", module=path, module_type=kind, reason=reason
        ) from error
    if tracer.hazard is not None:  # raised inside the model's code, and swallowed by its own ``except``
        path, kind, hazard = tracer.hazard
        where = f"submodule {path!r} ({kind})" if path else f"the forward of {kind} itself"
        raise TraceFailedError(f"torch.fx cannot trace {where}: {hazard}", module=path, module_type=kind, reason=str(hazard))
    source = getattr(type(model), "_fxtap_source", model)
    return Traced(graph, root, tracer.points, tracer.inlined, tracer.naming, source, tracer.reads_grad_mode)


def build(
    traced: Traced,
    request: dict[str, str],
    *,
    keep_output: bool,
    detach: bool,
    run_modules: frozenset[str] = frozenset(),
    edits: dict[str, nn.Module] | None = None,
) -> fx.GraphModule:
    """A ``GraphModule`` computing only ``request`` (``{tap name: output key}``), returning a dict.

    Every name in ``request`` and ``edits`` must be in ``traced.points``. Calls of the leaf
    modules in ``run_modules`` are kept too: hooks inside them capture other requested values.
    ``edits`` (name -> module) replace values by the module's result (``_edit.insert``); a tap
    of an edited name, or downstream of one, sees the edited value.
    """
    with gc_paused():
        return _build(traced, request, keep_output=keep_output, detach=detach, run_modules=run_modules, edits=edits or {})


def _build(
    traced: Traced,
    request: dict[str, str],
    *,
    keep_output: bool,
    detach: bool,
    run_modules: frozenset[str],
    edits: dict[str, nn.Module],
) -> fx.GraphModule:
    graph, env, old_output = copy_without_output(traced)
    points = {key: _copied(traced.points[name], env) for name, key in request.items()}
    root, inserted = traced.root, None
    if edits:
        position = {node: i for i, node in enumerate(graph.nodes)}
        inserted = _edit.insert(graph, traced.root, {n: _copied(traced.points[n], env) for n in edits}, edits)
        root = inserted.root
        keys = {key: _edit.order_key(position, p.moment, p.kind, p.name) for key, p in points.items()}
        points = {key: _moved(p, inserted.remap(p.value, keys[key])) for key, p in points.items()}
        old_output = inserted.end(old_output)
    values: dict[str, Argument] = {key: p.value for key, p in points.items()}
    moments = {key: p.moment for key, p in points.items()}
    ends = _nodes_of([old_output]) if keep_output else []
    decided = _plan(graph, root, values, moments, ends, run_modules)
    if inserted is not None:  # a tensor handed in as an edit: copied where a kept in-place op would write into it
        kept_patches = [n for n in inserted.patches if n in decided.kept]
        copies = _edit.protect(graph, kept_patches, lambda node: written_after(graph, root, node, decided.kept))
        if copies:
            values = {key: fx.node.map_arg(v, lambda n: copies.get(n, n)) for key, v in values.items()}
            moments = {key: copies.get(m, m) for key, m in moments.items()}
            old_output = fx.node.map_arg(old_output, lambda n: copies.get(n, n))
            decided = _plan(graph, root, values, moments, _nodes_of([old_output]) if keep_output else [], run_modules)
    for node in reversed(list(graph.nodes)):
        if node not in decided.kept:
            graph.erase_node(node)
    snapshots: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
    for (node, moment), anchor in decided.copies.items():
        with graph.inserting_after(anchor):
            snapshots[(node, moment)] = graph.call_function(copy_value, (node,))
    outputs: dict[str, Argument] = {
        key: materialize(graph, fx.node.map_arg(value, _snapshot_of(snapshots, moments[key]))) for key, value in values.items()
    }
    if keep_output:
        outputs["output"] = old_output
    if detach:
        outputs = {key: graph.call_function(detach_value, (v,)) for key, v in outputs.items()}
    graph.output(outputs)
    for_torchscript(graph)
    graph.lint()
    module = fx.GraphModule(root, graph, class_name=f"Tapped{type(traced.root).__name__}")  # root: the model and its edit modules
    if traced.source is not None:
        called = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
        read = {str(n.target) for n in traced.graph.nodes if n.op == "get_attr"}
        module.meta["fxtap_guard"] = _guard.watch(traced.source, traced.inlined, called, traced.reads_grad_mode, read)
    return module


def _plan(
    graph: fx.Graph,
    root: nn.Module,
    values: dict[str, Argument],
    moments: dict[str, fx.Node],
    ends: list[fx.Node],
    run_modules: frozenset[str],
) -> Any:
    wanted = [(node, moments[key]) for key, value in values.items() for node in _nodes_of([value])]
    wanted += [(n, n) for n in graph.nodes if n.op == "call_module" and n.target in run_modules]
    return plan(graph, root, wanted, ends)


def _copied(point: TapPoint, env: dict[fx.Node, fx.Node]) -> TapPoint:
    """``point`` with the nodes of the graph copy."""
    return point._replace(value=fx.node.map_arg(point.value, env.__getitem__), moment=env[point.moment])


def _moved(point: TapPoint, value: Argument) -> TapPoint:
    """``point`` read as ``value``: after an edit, the tap is taken after the edit's last node."""
    if value is point.value:
        return point
    position = {node: i for i, node in enumerate(point.moment.graph.nodes)}
    latest = max([point.moment, *_nodes_of([value])], key=position.__getitem__)
    return point._replace(value=value, moment=latest)


def copy_without_output(traced: Traced) -> tuple[fx.Graph, dict[fx.Node, fx.Node], Argument]:
    """A copy of the traced graph without its output node: the copy, old node -> new node, and
    what the output node returned (in the copy's nodes)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_output = graph.graph_copy(traced.graph, env)
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
    return graph, env, old_output


def _snapshot_of(snapshots: dict[tuple[fx.Node, fx.Node], fx.Node], moment: fx.Node) -> Any:
    def pick(node: fx.Node) -> fx.Node:
        return snapshots.get((node, moment), node)

    return pick


def _nodes_of(values: list[Argument]) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return found
