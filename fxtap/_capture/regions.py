"""Local tracing under untraceable code: the traceable submodules of an eagerly running module.

When a module's own ``forward`` cannot be traced (every Hugging Face model's root, the detection
models' ``GeneralizedRCNN``), it runs eagerly, but each child that holds requested names is
traced on its own, *with the arguments of the actual call*: tensors become graph inputs and
every other argument (``None`` masks, flags, ints) is fixed at its value. During a tapped call
the child's ``forward`` is swapped for that graph (an instance attribute, removed in ``finally``),
so functional-op names inside it (a residual ``add``) stay tappable. Every call of the child
runs a graph; ``_names.Replay`` names the values of its second call ``blk_1``, ``blk.add_1``, as
a trace of the whole model would. A child whose own code fails too is opened in turn; only what
lies in untraceable code itself is left to hooks.
"""

from __future__ import annotations

import inspect
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .._errors import FxtapError
from .._values import copy_value, detach_value
from . import analysis as _plan
from . import fx as _fx
from . import guard as _guard
from . import hooks as _hooks
from . import names as _names
from .edit import Patch
from .hazards import is_fxtap_hook
from .model import ModelPaths, own_forward, stand_in

__all__ = ["Region", "Resolution", "resolve", "serve", "trace_alone"]

class _Input(NamedTuple):
    """A graph input: a tensor, or an object such as a cache."""

    position: int


class _Fixed(NamedTuple):
    """A simple value (None, a flag, an int) fixed in the graph."""

    value: Any


class _Sequence(NamedTuple):
    """A plain list or tuple rebuilt around its items, so traced code can loop over it."""

    kind: type
    items: tuple[_Slot, ...]


class _Mapping(NamedTuple):
    """A plain dict with string keys rebuilt around its items."""

    kind: type
    items: tuple[tuple[str, _Slot], ...]


_Slot = _Input | _Fixed | _Sequence | _Mapping


def _freeze(slot: _Slot) -> Hashable:
    if isinstance(slot, _Input):
        return ("T", slot.position)
    if isinstance(slot, _Fixed):
        return ("C", type(slot.value).__name__, repr(slot.value))
    if isinstance(slot, _Sequence):
        return ("L", slot.kind.__name__, tuple(_freeze(s) for s in slot.items))
    return ("D", slot.kind.__name__, tuple((k, _freeze(s)) for k, s in slot.items))


def _rebuild(slot: _Slot, inputs: tuple[Any, ...]) -> Any:
    if isinstance(slot, _Input):
        return inputs[slot.position]
    if isinstance(slot, _Fixed):
        return slot.value
    if isinstance(slot, _Sequence):
        return slot.kind(_rebuild(s, inputs) for s in slot.items)
    return slot.kind((k, _rebuild(s, inputs)) for k, s in slot.items)


@dataclass(frozen=True)
class _Template:
    """How one call's arguments split into graph inputs and fixed values."""

    positional: tuple[_Slot, ...]
    keywords: tuple[tuple[str, _Slot], ...]
    count: int
    input_types: tuple[str, ...] = ()

    def key(self) -> Hashable:
        return (
            tuple(_freeze(s) for s in self.positional),
            tuple((k, _freeze(s)) for k, s in self.keywords),
            self.input_types,
        )


_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _call_template(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Template, list[Any]]:
    """Tensors and objects (a ``DynamicCache``) become graph inputs; simple values are fixed."""
    inputs: list[Any] = []

    def slot(value: Any) -> _Slot:
        if type(value) in (list, tuple):
            return _Sequence(type(value), tuple(slot(v) for v in value))
        if type(value) in (dict, OrderedDict) and all(isinstance(k, str) for k in value):
            return _Mapping(type(value), tuple((k, slot(v)) for k, v in value.items()))
        if isinstance(value, _SIMPLE):
            return _Fixed(value)
        inputs.append(value)
        return _Input(len(inputs) - 1)

    positional = tuple(slot(a) for a in args)
    keywords = tuple((k, slot(v)) for k, v in kwargs.items())
    # a tensor is a tensor (torch.export's fake tensors too: the exported call reuses the graphs
    # that the eager call just before it built and checked, see export.py)
    types = tuple("Tensor" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
    return _Template(positional, keywords, len(inputs), types), inputs


_OWN_FORWARD = "has a forward of its own, set on the object (its class's code is not what runs): it runs eagerly"


def _default_template(module: nn.Module) -> _Template:
    """The call ``tap()`` checks names with: required arguments are tensors, the rest defaults."""
    positional: list[_Slot] = []
    count = 0
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            positional.append(_Input(count))
            count += 1
    return _Template(tuple(positional), (), count)


def _shim(module: nn.Module, template: _Template, spec: list[Any]) -> nn.Module:
    """A stand-in for ``module`` (same attributes, same submodules) whose forward takes only the
    tensors and returns the flat leaves of the output; the output's structure goes to ``spec``
    (a graph output cannot hold a ``ModelOutput`` or a namedtuple of its own)."""
    original = type(module).forward

    def call(self: nn.Module, inputs: tuple[Any, ...]) -> Any:
        args = [_rebuild(slot, inputs) for slot in template.positional]
        kwargs = {k: _rebuild(slot, inputs) for k, slot in template.keywords}
        leaves, structure = pytree.tree_flatten(original(self, *args, **kwargs))
        spec[:] = [structure]
        return leaves

    names = [f"input_{i}" for i in range(template.count)]
    packed = f"({', '.join(names)}{',' if len(names) == 1 else ''})"
    namespace: dict[str, Any] = {}
    params = "".join(f", {n}" for n in names)
    exec(f"def make(_call):\n    def forward(self{params}):\n        return _call(self, {packed})\n    return forward\n", namespace)
    made = namespace["make"](call)
    # the module's own globals: FX wraps the functions it finds there (``autowrap_functions``, math)
    forward = types.FunctionType(made.__code__, getattr(original, "__globals__", namespace), "forward", None, made.__closure__)
    # _fxtap_called: the module's own __call__ runs its hooks around the graph; _fxtap_source: whose state a guard watches
    body = {"forward": forward, "__module__": type(module).__module__, "_fxtap_called": True, "_fxtap_source": module}
    cls: Any = type(type(module).__name__, (type(module),), body)
    return stand_in(module, cls)


def trace_alone(module: nn.Module, hints: _fx.Hints = _fx.NO_HINTS) -> _fx.Traced | None:
    """``module`` traced on its own for its default call (``None`` when its own code fails)."""
    return _plan.analyse(_shim(module, _default_template(module), []), mode="auto", concrete_args=None, hints=hints).traced


@dataclass
class Region:
    """A submodule traced on its own, for every call it gets during a tapped forward.

    ``wanted`` maps each requested global name to its local name in the module's graph (``""``
    is the module's own output); which call a name belongs to is found per call by
    ``_names.Replay``, so ``blk.add_1`` is the local ``add`` of the second call.
    """

    path: str
    module: nn.Module
    wanted: dict[str, str]
    paths: ModelPaths  # module and other attribute paths of ``root``
    keep: frozenset[str] = frozenset()  # local leaf paths that hooks need to run
    root: nn.Module | None = None  # the whole model, for hooks when no graph fits a call
    opaque: dict[str, tuple[str, str]] = field(default_factory=dict)  # local leaves chosen at tap() time
    hookable: dict[str, _hooks.HookTarget] = field(default_factory=dict)  # wanted names that are calls of inner modules
    failed: str = ""  # why the last call could not use a graph
    edits: dict[str, nn.Module] = field(default_factory=dict)  # global name -> edit, inserted in the graph of that call
    hints: _fx.Hints = field(default_factory=_fx.Hints)  # the user's tracer hints
    lenient: bool = False  # a recorded call (fxtap.names(model, inputs)): a graph with the wanted names it has
    _graphs: _guard.GraphCache[_Graph | _NoGraph] = field(default_factory=_guard.GraphCache)

    def __post_init__(self) -> None:
        self.reserved = self.paths.reserved  # names a later module call's suffix skips

    def run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], replay: _names.Replay
    ) -> tuple[Any, dict[str, Any], _Graph, dict[str, str]] | None:
        """The module's output, the graph's values by local name, the graph and this call's
        global names (``replay`` names the call); ``None`` when no graph fits this call."""
        template, tensors = _call_template(args, kwargs)
        built = self._graph(template, ())
        if built is None:
            return None
        names = replay.call(built.naming)
        # the edits of this call (a later call of the module has other names): a graph of their own
        local = tuple((n, g) for n, g in names.items() if n and g in self.edits)
        if local:
            built = self._graph(template, local)
            if built is None:
                return None
        values = built.module(*tensors)
        output = pytree.tree_unflatten(values["output"], built.structure)
        return output, {local: values[k] for local, k in built.keys.items()}, built, names

    def _graph(self, template: _Template, edits: tuple[tuple[str, str], ...]) -> _Graph | None:
        key = (self.module.training, template.key(), edits)
        built = self._graphs.lookup(key)
        if built is None:
            with _fx.exclusive():  # concurrent first calls build once
                built = self._graphs.lookup(key)
                if built is None:
                    built = self._build(template, {local: self.edits[name] for local, name in edits}) or _NoGraph()
                    if not _guard.tracing_here():  # one built while torch.export traces may hold its fake tensors
                        self._graphs.put(key, built, built.module.meta.get("fxtap_guard") if isinstance(built, _Graph) else None)
        return None if isinstance(built, _NoGraph) else built

    def _build(self, template: _Template, edits: dict[str, nn.Module]) -> _Graph | None:
        # the submodules that were opaque when the names were placed stay opaque, so that names
        # placed on hooks inside them are still hooked (a list argument may make them traceable)
        if own_forward(self.module) is not None:  # set on the object since the names were placed
            self.failed = f"{self.path!r} {_OWN_FORWARD}"
            return None
        spec: list[Any] = []
        shim = _shim(self.module, template, spec)
        analysis = _plan.analyse(shim, mode="auto", concrete_args=None, fallbacks=self.opaque, hints=self.hints)
        if analysis.traced is None:
            self.failed = f"{self.path!r} cannot be traced for this call: {analysis.fallbacks[''][1]}"
            return None
        inner = sorted({local for local in self.wanted.values() if local})  # "" is the output itself
        if self.lenient:  # names this call's graph lacks are simply not produced by it
            inner = [local for local in inner if local in analysis.traced.points]
        missing = [local for local in [*inner, *edits] if local not in analysis.traced.points]
        if missing:
            self.failed = f"{self.path!r} traced for this call has no {', '.join(map(repr, missing))}"
            return None
        keys = {local: f"v{i}" for i, local in enumerate(inner)}  # a local name may be "output"
        graph = _fx.build(analysis.traced, keys, keep_output=True, detach=False, run_modules=self.keep, edits=edits)
        inlined = {_names.join(self.path, p): n for p, n in analysis.traced.inlined.items()}
        points = tuple(local for local, point in analysis.traced.points.items() if point.kind != "input")
        return _Graph(graph, keys, inlined, analysis.traced.naming, spec[0] if spec else None, points)


class _NoGraph:
    """No graph fits calls with this key (cached, so that such calls do not trace again)."""


@dataclass
class _Graph:
    module: fx.GraphModule
    keys: dict[str, str]  # local name -> the graph's output key
    inlined: dict[str, int]  # module path -> calls traced through (no hook fires)
    naming: list[tuple[str, str, str]]  # the trace's naming log, for _names.Replay
    structure: Any  # the output's pytree structure (the shim returns its flat leaves)
    points: tuple[str, ...] = ()  # every local name this graph computes, for a recorded call


@dataclass
class Resolution:
    """Where each requested name of an eagerly running model is captured."""

    regions: list[Region] = field(default_factory=list)
    fx: dict[str, str] = field(default_factory=dict)  # global name -> module type, from a region graph
    hooks: dict[str, _hooks.HookTarget] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # eager or opaque code: path -> (type, reason)
    available: list[str] = field(default_factory=list)  # every FX name found, for suggestions
    traced: list[str] = field(default_factory=list)  # paths of the children traced on their own (whose graphs list ``available``)
    root: nn.Module | None = None
    hints: _fx.Hints = field(default_factory=_fx.Hints)  # the user's tracer hints


def resolve(
    model: nn.Module, names: list[str], root_reason: tuple[str, str], *, everything: bool = False, hints: _fx.Hints = _fx.NO_HINTS
) -> Resolution:
    """Place ``names`` of a model whose own forward runs eagerly (``everything``: trace all children)."""
    result = Resolution(fallbacks={"": root_reason}, root=model, hints=hints)
    paths = ModelPaths.of(model)
    leftover = _resolve_in(model, "", names, result, everything, paths)
    targets, unknown = _hooks.hook_targets(model, leftover, paths)
    result.hooks.update(targets)
    result.unknown = unknown
    return result


_MAX_CALLS = 4096  # a later-call name is looked for among this many calls of a module at most


def _resolve_in(
    module: nn.Module,
    prefix: str,
    names: list[str],
    result: Resolution,
    everything: bool,
    paths: ModelPaths,
) -> list[str]:
    """Resolve names inside the children of an eagerly running ``module``; return the unplaced ones."""
    leftover = list(names)
    root = result.root if result.root is not None else module
    for child_name, child in module.named_children():
        path = _names.join(prefix, child_name)
        later = [n for n in leftover if n.startswith(path + "_")]  # path_1: a later call of the child
        calls = _hooks.hook_targets(root, later, paths)[0] if later else {}
        inside = [n for n in leftover if _names.inside(n, path) or (n in calls and calls[n].path == path)]
        if (not inside and not everything) or _fx.is_standard_leaf(child) or isinstance(child, result.hints.leaf_modules):
            continue
        leftover = [n for n in leftover if n not in inside]
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called: look at its items
            leftover += _resolve_in(child, path, inside, result, everything, paths)
            continue
        if own_forward(child) is not None:  # its class's code is not what runs: the child runs eagerly
            result.fallbacks[path] = (type(child).__name__, _OWN_FORWARD)
            leftover += _resolve_in(child, path, inside, result, everything, paths)
            continue
        try:
            analysis = _plan.analyse(_shim(child, _default_template(child), []), mode="auto", concrete_args=None, hints=result.hints)
        except (TypeError, ValueError) as error:  # no usable signature: leave the child to hooks
            result.fallbacks[path] = (type(child).__name__, f"{type(error).__name__}: {error}")
            leftover += inside
            continue
        for sub, (kind, reason) in analysis.fallbacks.items():
            result.fallbacks[_names.join(path, sub)] = (type(child).__name__ if not sub else kind, reason)
        if analysis.traced is None:
            leftover += _resolve_in(child, path, inside, result, everything, paths)
            continue
        result.traced.append(path)
        points = {n: p for n, p in analysis.traced.points.items() if p.kind != "input"}
        wanted = _place(path, analysis.traced.naming, points, inside, paths, result)
        if child.__dict__.get("_forward_hooks") and any(not is_fxtap_hook(h) for h in child._forward_hooks.values()):
            # the user's forward hooks run after the graph and may change its output: a hook of
            # fxtap's, registered after them, captures the child's own output instead
            wanted = {name: local for name, local in wanted.items() if local}
        leftover += [n for n in inside if n not in wanted]
        if wanted:
            keep = frozenset(analysis.hookable_under()) - {""}
            hookable = {
                n: t for n, t in _hooks.hook_targets(root, list(wanted), paths)[0].items() if t.path != path
            }  # the module's own calls come from the graph's output
            opaque = {sub: why for sub, why in analysis.fallbacks.items() if sub}
            result.regions.append(Region(path, child, wanted, paths, keep, root=root, opaque=opaque, hookable=hookable, hints=result.hints))
            result.fx.update({g: points[n].module_type if n else type(child).__name__ for g, n in wanted.items()})
    return leftover


def _place(
    path: str,
    naming: list[tuple[str, str, str]],
    points: dict[str, Any],
    inside: list[str],
    paths: ModelPaths,
    result: Resolution,
) -> dict[str, str]:
    """Global name -> local name for the names of ``inside`` that some call of the module at
    ``path`` produces, if every call runs the graph of the default call."""
    replay = _names.Replay(path, *paths)
    first = replay.call(naming)
    result.available += [first[n] for n in points]
    wanted = {first[n]: n for n in ["", *points] if first[n] in inside}
    later = {n for n in inside if n not in wanted}
    numbers = [int(k) for n in later for k in _names.CALL_NUMBER.findall(n)]
    for _ in range(min(max(numbers, default=0), _MAX_CALLS)):  # the k-th later call has suffixes >= k
        if not later:
            break
        for local, name in replay.call(naming).items():
            if name in later and (not local or local in points):
                wanted[name] = local
                later.discard(name)
    return wanted


_SWAP_LOCK = threading.Lock()  # guards installing and removing routers, across Tapped objects


class _Router:
    """Installed as a module's instance ``forward`` while at least one tapped call needs it.

    Each thread's tapped call registers its own handler; any other call (another thread, or no
    tapped call at all) goes to the module's own forward. The last one out removes the router.
    """

    fxtap_installed = True  # _model.preserved leaves it in place: it belongs to running calls

    def __init__(self, module: nn.Module, previous: Any) -> None:
        self.module = module
        self.previous = previous
        self.routes: dict[int, list[Callable[..., Any]]] = {}

    def original(self) -> Callable[..., Any]:
        if self.previous is not None:
            return self.previous  # type: ignore[no-any-return]
        return types.MethodType(type(self.module).forward, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handlers = self.routes.get(threading.get_ident())
        return (handlers[-1] if handlers else self.original())(*args, **kwargs)


@contextmanager
def serve(regions: list[Region], state: _hooks.CallLog, *, detach: bool) -> Iterator[None]:
    """Route each region's calls in this thread to its graph during the block (every call, named by _names.Replay)."""
    thread = threading.get_ident()
    routers: list[_Router] = []
    try:
        for region in regions:
            with _SWAP_LOCK:
                router = region.module.__dict__.get("forward")
                if not isinstance(router, _Router):
                    router = _Router(region.module, router)
                    region.module.__dict__["forward"] = router
                handler = _dispatcher(region, router.original(), state, detach)
                router.routes.setdefault(thread, []).append(handler)
                routers.append(router)
        yield
    finally:
        with _SWAP_LOCK:
            for router in reversed(routers):
                handlers = router.routes[thread]
                handlers.pop()
                if not handlers:
                    del router.routes[thread]
                if not router.routes:
                    if router.previous is None:
                        router.module.__dict__.pop("forward", None)
                    else:
                        router.module.__dict__["forward"] = router.previous


def _dispatcher(region: Region, original: Callable[..., Any], state: _hooks.CallLog, detach: bool) -> Callable[..., Any]:
    replay: _names.Replay | None = _names.Replay(region.path, *region.paths)  # None once a call had no graph
    count = 0  # calls of the module so far in this forward

    def keep(name: str, value: Any) -> None:
        if name in region.wanted:
            state.add(name, detach_value(value) if detach else value)

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal replay, count
        own = _names.module_call_name(region.path, count, region.reserved)
        count += 1
        state.served[region.path] = count
        current = replay
        result = region.run(args, kwargs, current) if current is not None else None
        if current is None or result is None:
            replay = None  # later calls cannot be named without this call's graph: they run eagerly too
            return _eager(region, original, state, own, keep, args, kwargs)
        output, values, graph, names = result
        if state.record is not None:  # fxtap.names(model, inputs): every name this call produces
            for local in (*graph.points, ""):
                state.record.add(names[local], (region.path, local))
        output = _edit_output(region, names[""], output)
        state.edited_in_graphs.update(name for name in names.values() if name in region.edits)
        for path, calls in graph.inlined.items():  # keep hook call numbering right for later calls
            state.calls[path] = state.calls.get(path, 0) + calls
        shared = _storages((output, args, kwargs))
        keep(names[""], copy_value(output))  # the module's own output: eager code goes on with it, so copy
        for local, value in values.items():
            if _storages(value) & shared:
                value = copy_value(value)  # eager code after this module may write into it
            keep(names[local], value)
        return output

    return forward


def _eager(
    region: Region,
    original: Callable[..., Any],
    state: _hooks.CallLog,
    own: str,
    keep: Callable[[str, Any], None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run a call that no graph fits: names of inner module calls still come from hooks."""
    edits = _hookable_edits(region, own)
    if region.root is None or not (region.hookable or edits):
        output = original(*args, **kwargs)
    else:
        with _hooks.capture(region.root, region.hookable, edits=edits) as inner:
            inner.calls.update(state.calls)  # number calls across the whole forward, not from here
            output = original(*args, **kwargs)
        for path, calls in inner.calls.items():
            state.calls[path] = max(state.calls.get(path, 0), calls)
        for name, value in inner.values.items():
            keep(name, value)
        state.edited_in_graphs.update(n for n, (t, _) in edits.items() if (t.path, t.call_index) in inner.edited)
    output = _edit_output(region, own, output)
    if own in region.edits:
        state.edited_in_graphs.add(own)
    keep(own, copy_value(output))
    return output


def _edit_output(region: Region, name: str, output: Any) -> Any:
    """The module's own output, edited when this call's name is edited (as a forward hook would)."""
    edit = region.edits.get(name)
    if edit is None:
        return output
    return copy_value(edit(output)) if isinstance(edit, Patch) else edit(output)


def _hookable_edits(region: Region, own: str) -> dict[str, tuple[_hooks.HookTarget, nn.Module]]:
    """The region's edits for a call that runs eagerly: inner module calls go to hooks; an op
    inside cannot be edited without the graph, and fxtap never drops an edit silently."""
    names = [name for name in region.edits if name != own and not name.startswith(region.path + "_")]
    targets, ops = _hooks.hook_targets(region.root or region.module, names, region.paths)
    if ops:
        raise FxtapError(f"cannot apply the edits {', '.join(map(repr, ops))}: {region.failed or 'no graph fits this call'}")
    return {name: (target, region.edits[name]) for name, target in targets.items() if target.path != region.path}


def _storages(value: Any) -> set[int]:
    found: set[int] = set()

    def visit(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            found.add(v.untyped_storage()._cdata)  # the storage itself: also for the fake tensors of torch.export
        return v

    fx.node.map_aggregate(value, visit)
    return found
