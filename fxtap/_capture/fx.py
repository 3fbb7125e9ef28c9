"""The FX path: trace a model with tap names on every node, then rewrite the graph to return taps.

``trace`` runs a ``torch.fx.Tracer`` subclass that overrides only ``call_module``,
``create_proxy`` and ``proxy``: it names every node by the rules of ``_names`` and records each
module call's return value. ``build`` copies the traced graph, keeps only what the requested
values need (``_prune.plan``), snapshots values that a later in-place op would overwrite, and
returns a ``GraphModule`` whose output is a dict.
"""

from __future__ import annotations

import gc
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import fx, nn
from torch.fx.node import Argument

from .._errors import TraceFailedError, summary
from .._values import copy_value, detach_value
from . import names as _names
from .model import attribute_paths, preserved, stand_in
from . import edit as _edit
from .prune import from_torch_nn, plan, written_after

__all__ = ["TapPoint", "Traced", "build", "gc_paused", "trace"]


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


for _op in "iadd iand ifloordiv ilshift imod imul imatmul ior ipow irshift isub itruediv ixor".split():
    setattr(_Proxy, f"__{_op}__", _inplace_dunder(getattr(operator, _op)))


def is_standard_leaf(module: nn.Module) -> bool:
    """torch.fx's own leaf rule: modules from ``torch.nn`` itself, except the containers."""
    return from_torch_nn(module) and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _TapTracer(fx.Tracer):
    """The tracer: torch.fx's symbolic tracer, plus a name for every value it records.

    It overrides only the tracer's hooks. ``call_module`` traces through a module (or records
    a leaf's call), names the module's return value by its path and call count, and records the
    node after which that value is final (``TapPoint.moment``); ``create_proxy`` names each
    functional op by the scope whose forward ran it. Untraceable code raises out of the trace
    with ``failure`` set to the innermost module whose forward raised, so ``analyse`` can make
    exactly that module a leaf.
    """

    def __init__(self, root: nn.Module, leaves: frozenset[nn.Module]) -> None:
        super().__init__(autowrap_modules=(math,))
        self._leaves = leaves
        self.namer = _names.Namer(*attribute_paths(root))
        self.points: dict[str, TapPoint] = {}
        self.failure: tuple[str, str] | None = None  # innermost (path, type) whose forward raised
        self._calls: dict[str, int] = {}
        self.inlined: dict[str, int] = {}
        self.naming: list[tuple[str, str, str]] = []  # what _names.Replay needs to name later calls
        self._scopes: list[tuple[str, str]] = [("", type(root).__name__)]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._leaves or is_standard_leaf(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
            # m.forward, not the hook-running __call__: user hooks must never see proxies.
            out = super().call_module(m, m.forward, args, kwargs)
        except Exception:
            if self.failure is None:
                self.failure = (path, kind)
            raise
        finally:
            self._scopes.pop()
        self._record(name, "module", out, kind, path, moment=next(iter(reversed(self.graph.nodes))))
        return out

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
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
        nodes = fx.node.map_aggregate(value, lambda v: v.node if isinstance(v, fx.Proxy) else v)
        found: list[fx.Node] = []
        fx.node.map_arg(nodes, found.append)
        if found:  # a module returning no tensor-derived value has nothing to tap
            last = found[-1] if moment is None else moment  # one node, unless a module returned a container
            self.points[name] = TapPoint(name, kind, nodes, module_type, scope, last)


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


def trace(model: nn.Module, *, leaves: frozenset[nn.Module] = frozenset(), concrete_args: dict[str, Any] | None = None) -> Traced:
    """Trace ``model`` and name every node.

    Raises:
        TraceFailedError: tracing failed; ``.module`` names the innermost submodule whose
            ``forward`` raised ("" when it is the root's own code).
    """
    root = stand_in(model)
    tracer = _TapTracer(root, leaves)
    try:
        with preserved(model), gc_paused():
            graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as error:
        path, kind = tracer.failure or ("", type(model).__name__)
        reason = summary(error)
        where = f"submodule {path!r} ({kind})" if path else f"the forward of {kind} itself"
        raise TraceFailedError(
            f"torch.fx cannot trace {where}: {reason}", module=path, module_type=kind, reason=reason
        ) from error
    return Traced(graph, root, tracer.points, tracer.inlined, tracer.naming)


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
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_output = graph.graph_copy(traced.graph, env)
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
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
        key: fx.node.map_arg(value, _snapshot_of(snapshots, moments[key])) for key, value in values.items()
    }
    if keep_output:
        outputs["output"] = old_output
    if detach:
        outputs = {key: graph.call_function(detach_value, (v,)) for key, v in outputs.items()}
    graph.output(outputs)
    for node in graph.nodes:
        node.type = None  # string annotations (``from __future__ import annotations``) break TorchScript
    graph.lint()
    return fx.GraphModule(root, graph, class_name=f"Tapped{type(traced.root).__name__}")


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


def _snapshot_of(snapshots: dict[tuple[fx.Node, fx.Node], fx.Node], moment: fx.Node) -> Any:
    def pick(node: fx.Node) -> fx.Node:
        return snapshots.get((node, moment), node)

    return pick


def _nodes_of(values: list[Argument]) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return found
