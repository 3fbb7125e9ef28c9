"""The FX path: trace a model with tap names on every node, then rewrite the graph to return taps.

``trace`` runs ``tracer._TapTracer`` (torch.fx's symbolic tracer, which names every node by the
rules of ``_names`` and records each module call's return value) under the checks of what a
graph cannot hold (``hazards``, ``state``, ``model.preserved``). ``build`` copies the traced graph,
keeps only what the requested values need (``_prune.plan``), snapshots values that a later
in-place op would overwrite, and returns a ``GraphModule`` whose output is a dict.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.fx.node import Argument

from .._errors import TraceFailedError, summary
from .._values import copy_value, detach_value
from . import edit as _edit
from . import guard as _guard
from . import hazards as _hazards
from .codegen import (
    CodeError,
    Made,
    check_code,
    for_torchscript,
    materialize,
    realize,
    split_fixed,
    with_fixed,
)
from .model import own_forward, preserved, stand_in
from .prune import plan, written_after
from .state import random_calls_recorded, rebinding_checked
from .tracer import NO_HINTS, Hints, TapPoint, _TapTracer, is_standard_leaf

__all__ = [
    "NO_HINTS", "Hints", "Made", "TapPoint", "Traced", "Unwritten", "build", "copy_without_output", "exclusive", "gc_paused",
    "is_standard_leaf", "realize", "trace",
]  # fmt: skip

# torch.fx patches ``nn.Module.__call__``/``__getattr__`` on the class while it traces and puts
# back what it found when it is done: two traces overlapping in time would put back each other's
# patches. So fxtap traces (and builds what it caches) one at a time; the tracer itself sends
# other threads' module calls and attribute reads to the original code (see ``_TapTracer``).
_EXCLUSIVE = threading.RLock()


def exclusive() -> threading.RLock:
    """The lock held while fxtap traces: hold it to build something once, across threads."""
    return _EXCLUSIVE


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
    code_checked: bool = True  # False: FX's code of the graph was not written yet (trace(write_code=False))
    typed_leaves: frozenset[str] = frozenset()  # leaf modules whose output type the graph relies on (proxy_types)


class Unwritten(Exception):
    """FX could not write the code of a graph built from a trace whose code was not checked
    (``trace(write_code=False)``): trace again with ``write_code=True``, which blames the module."""


def _root_hazard(model: nn.Module) -> str:
    """Why the root's own forward must run eagerly whatever its code: hooks that only ``__call__`` runs."""
    found = _hazards.global_hooks()
    if found:
        return f"global module hooks are registered ({found}; fxtap cannot trace through user hooks)"
    if getattr(type(model), "_fxtap_called", False):
        return ""  # a submodule traced on its own: its own __call__ runs its hooks around the graph
    if own_forward(model) is not None:
        return "has a forward of its own, set on the object (its class's code, which torch.fx would trace, is not what runs)"
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
    write_code: bool = True,
) -> Traced:
    """Trace ``model`` and name every node.

    ``write_code=False`` checks the attribute paths that FX's code names, but does not write the
    graph's whole code (``codegen.check_code``): ``build`` then raises ``Unwritten`` where FX
    cannot write the code of the graph it builds, and the caller traces again with ``True``.

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
            check_code(graph, root, write=write_code)
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
        path, kind, swallowed = tracer.hazard
        where = f"submodule {path!r} ({kind})" if path else f"the forward of {kind} itself"
        raise TraceFailedError(f"torch.fx cannot trace {where}: {swallowed}", module=path, module_type=kind, reason=str(swallowed))
    source = getattr(type(model), "_fxtap_source", model)
    traced = Traced(graph, root, tracer.points, tracer.inlined, tracer.naming, source, tracer.reads_grad_mode, write_code)
    traced.typed_leaves = frozenset(tracer.typed_leaves)
    return traced


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
    try:
        module = fx.GraphModule(root, graph, class_name=f"Tapped{type(traced.root).__name__}")  # root: the model and its edit modules
    except Exception as error:
        if traced.code_checked:
            raise
        raise Unwritten(summary(error)) from error
    if traced.source is not None:
        called = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
        read = {str(n.target) for n in traced.graph.nodes if n.op == "get_attr"}
        module.meta["fxtap_guard"] = _guard.watch(traced.source, traced.inlined, called, traced.reads_grad_mode, read, traced.typed_leaves)
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
