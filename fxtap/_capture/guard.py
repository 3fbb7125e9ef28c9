"""Keeping a built graph current: the model after ``tap()`` is the model that runs.

A graph built by fxtap calls the leaf modules it holds (``nn.Linear``, opaque blocks), which read
their own parameters and buffers at call time: ``model.half()`` on a leaf, an in-place
``load_state_dict`` or a parametrized leaf are seen without a rebuild. What a trace *bakes in* is
checked before every call by a ``Guard``, and a graph whose guard fails is rebuilt:

- the identity of every child of every module whose code was traced through (a swapped
  submodule), and the class of each of those modules (a parametrization changes it);
- how many attributes and submodules those modules have: one added after ``tap()`` (an adapter
  that ``forward`` looks for with ``hasattr``, ``getattr(self, "scale", 1.0)``);
- the ``forward`` those modules run: the class's (a patched ``Block.forward``) and an instance's
  own (``model.block.forward = ...``; fxtap's routers of a running call excepted);
- the identity of every parameter and buffer the graph reads itself (``get_attr``): a reassigned
  buffer, ``load_state_dict(assign=True)``, ``.half()`` replacing a buffer;
- the ``training`` flag of every module the graph traced through or calls whose code mentions
  ``training`` (with every module below a traced-through one that does): ``.eval()`` on one
  submodule;
- the plain Python attributes of the traced-through modules (``self.alpha``, a schedule): by
  identity, and for a list, dict or set by its items; an attribute that holds a plain object (a
  config such as Hugging Face's ``self.config``, a ``SimpleNamespace``) is watched inside too,
  the attributes of that object and of the objects it holds, three levels deep, so that
  ``model.config.scale = 2.0`` after ``tap()`` rebuilds what a trace baked in;
- user hooks: any hook registered anywhere since the last check (``RemovableHandle.next_id``
  moved) makes the guard look at the traced-through modules and the global registries;
- the grad mode, when the traced code read ``torch.is_grad_enabled()``.

The check is a few C-level passes over flat lists (benchmarks/run.py measures it). Graphs are
kept in a ``GraphCache`` of at most ``LIMIT`` entries per ``Tapped`` (and per submodule traced on
its own): a model called with ever new argument values rebuilds, it does not grow.
"""

from __future__ import annotations

import enum
import threading
import types
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.utils.hooks import RemovableHandle

from .hazards import global_hooks, user_hooks
from .model import unrouted

__all__ = ["HOLDS", "LIMIT", "MODE", "STALE", "GraphCache", "Guard", "freeze", "of_runner", "traced_elsewhere", "watch", "watch_paths"]

HOLDS, MODE, STALE = 0, 1, 2  # Guard.check(): current; built for the other grad mode; outdated
LIMIT = 8  # graphs kept per Tapped (and per submodule traced on its own), least recently used dropped first

_MODULE_KEYS = frozenset(nn.Module().__dict__) | {"forward", "_fxtap_source"}
_CONTAINERS = (list, dict, set)
_MISSING: Any = object()


class Guard:
    """What a trace assumed about the model, checked before each call (see the module docstring)."""

    def __init__(
        self,
        slots: list[tuple[dict[str, Any], str]],
        typed: list[nn.Module],
        plain: list[tuple[dict[str, Any], str, Any]],
        hooked: list[nn.Module],
        reads_grad_mode: bool,
    ) -> None:
        self._dicts = [d for d, _ in slots]
        self._keys = [k for _, k in slots]
        # a router a running call installed as ``forward`` is not part of what was traced
        self._expected = [unrouted(d.get(k)) if k == "forward" else d.get(k) for d, k in slots]
        self._typed = typed
        self._types = [type(m) for m in typed]
        self._sized = [m.__dict__ for m in typed] + [m._modules for m in typed]
        self._sizes = [len(d) - (_routed_key(d) if i < len(typed) else 0) for i, d in enumerate(self._sized)]
        self._classes = list({id(type(m)): type(m) for m in typed}.values())
        self._forwards = [getattr(c, "forward", None) for c in self._classes]
        self._plain = [(d, k, v, _contents(v) if type(v) in _CONTAINERS else None) for d, k, v in plain]
        self._hooked = hooked
        self._next_hook = RemovableHandle.next_id
        self._reads_grad_mode = reads_grad_mode
        self._grad_mode = torch.is_grad_enabled()

    def _slots(self) -> list[tuple[dict[str, Any], str]]:
        return list(zip(self._dicts, self._keys))

    def _routed(self, now: list[Any]) -> bool:
        """Whether the only differences are fxtap's routers installed as ``forward`` by a running
        tapped call (``regions.serve``) over what was there before."""
        for value, expected, key in zip(now, self._expected, self._keys):
            if value is not expected and not (key == "forward" and unrouted(value) is expected):
                return False
        return True

    def _grown_by_routers(self, sizes: list[int]) -> bool:
        """Whether every attribute added since is a router installed as ``forward`` by a running call."""
        for attributes, now, then in zip(self._sized, sizes, self._sizes):
            if now != then and not (now == then + 1 and _routed_key(attributes)):
                return False
        return True

    def check(self) -> int:
        """``HOLDS``, ``MODE`` (only the grad mode differs) or ``STALE``."""
        # lists compare items by identity first: modules and bools never reach __eq__ unless changed
        now = list(map(dict.get, self._dicts, self._keys))
        if now != self._expected and not self._routed(now):
            return STALE
        if list(map(type, self._typed)) != self._types:
            return STALE
        sizes = list(map(len, self._sized))
        if sizes != self._sizes and not self._grown_by_routers(sizes):
            return STALE
        if [getattr(c, "forward", None) for c in self._classes] != self._forwards:
            return STALE
        for attributes, key, value, contents in self._plain:
            now = attributes.get(key, _MISSING)
            if now is not value or (contents is not None and not _same(_contents(now), contents)):
                return STALE
        if RemovableHandle.next_id != self._next_hook:  # a hook was registered somewhere since
            if global_hooks() or any(user_hooks(module) for module in self._hooked):
                return STALE
            self._next_hook = RemovableHandle.next_id
        if self._reads_grad_mode and torch.is_grad_enabled() != self._grad_mode:
            return MODE
        return HOLDS


def _routed_key(attributes: dict[str, Any]) -> int:
    """1 when ``forward`` is a router a running call added (it had no instance forward), else 0."""
    forward: Any = attributes.get("forward")
    return 1 if getattr(forward, "fxtap_installed", False) and forward.previous is None else 0


def watch(
    source: nn.Module,
    inlined: Iterable[str],
    called: Iterable[str],
    reads_grad_mode: bool,
    attributes: Iterable[str] = (),
    typed_leaves: Iterable[str] = (),
) -> Guard:
    """The guard of a trace of ``source`` that traced through the modules at ``inlined`` (paths,
    the root included implicitly), calls the leaf modules at ``called`` and reads the top-level
    parameters or buffers ``attributes``."""
    at = dict(source.named_modules(remove_duplicate=False))  # path -> module, every path (one walk, not one per path)
    through = _unique([source, *(at[p] for p in inlined if p)])
    leaves = _unique([m for p in called if (m := at.get(p)) is not None])
    known: dict[type, bool] = {}
    # a module whose code mentions ``training`` may read a descendant's flag (``self.drop.training``)
    moded = _unique([d for m in through if _reads_training(type(m), known) for d in m.modules()])
    moded = _unique(moded + [m for m in leaves if _reads_training(type(m), known)])
    slots: list[tuple[dict[str, Any], str]] = [(m.__dict__, "training") for m in moded]
    slots += [(m._modules, name) for m in through for name in m._modules]
    slots += [(m.__dict__, "forward") for m in through]  # an instance's own forward: normally none
    inside = {id(m) for m in through}
    for path in called:  # a leaf called from further up (``self.blocks[0].fc(x)``): guard the way to it
        parent_path, _, name = path.rpartition(".")
        parent = at.get(parent_path)
        if parent is not None and id(parent) not in inside:
            slots += watch_paths(source, [path])._slots()
    plain = [
        (m.__dict__, key, value)
        for m in through
        for key, value in m.__dict__.items()
        if key not in _MODULE_KEYS and not isinstance(value, nn.Module)
    ]
    plain += _inside_objects([value for _, _, value in plain])
    for target in attributes:  # parameters and buffers the graph reads (get_attr): by identity, with the plain values
        owner_path, _, name = target.rpartition(".")
        owner = at.get(owner_path)
        for registry in (owner._parameters, owner._buffers) if owner is not None else ():
            if name in registry:
                plain.append((registry, name, registry[name]))
    # leaves whose output type a kept ``isinstance`` relied on (proxy_types): their class, own
    # ``forward`` and hooks are part of what was traced
    relied = _unique([m for p in typed_leaves if (m := at.get(p)) is not None])
    slots += [(m.__dict__, "forward") for m in relied]
    return Guard(slots, _unique(through + relied), plain, _unique(through + relied), reads_grad_mode)


def of_runner(model: nn.Module, runner: Any) -> Guard | None:
    """The guard of a ``Runner``: its graph's, or for an eagerly running model, the paths of the
    submodules it traced on their own (their graphs have their own guards)."""
    if runner.graph is not None:
        return runner.graph.meta.get("fxtap_guard")  # type: ignore[no-any-return]
    regions = runner.placement.regions
    if regions:
        return watch_paths(model, [region.path for region in regions])
    return None


def watch_paths(root: nn.Module, paths: Iterable[str]) -> Guard:
    """A guard that fails when another module object sits at one of ``paths`` (or on the way)."""
    slots: list[tuple[dict[str, Any], str]] = []
    for path in paths:
        module = root
        for part in path.split(".") if path else []:
            slots.append((module._modules, part))
            module = module._modules[part]  # type: ignore[assignment]
    return Guard(slots, [], [], [], False)


_NOT_PLAIN = (nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType, enum.Enum)


def _inside_objects(values: list[Any], depth: int = 3) -> list[tuple[dict[str, Any], str, Any]]:
    """The attributes of the plain objects among ``values`` (and in their lists, tuples and dicts),
    of the objects those hold, ``depth`` levels deep, each object once: what a trace may have read
    through ``self.config.x`` and baked in as a constant."""
    found: list[tuple[dict[str, Any], str, Any]] = []
    seen: set[int] = set()
    level = values
    for _ in range(depth):
        objects = [o for v in level for o in _objects_in(v) if id(o) not in seen]
        level = []
        for obj in objects:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            attributes = vars(obj)
            found += [(attributes, key, value) for key, value in attributes.items()]
            level += list(attributes.values())
    return found


def _objects_in(value: Any, nesting: int = 0) -> list[Any]:
    if isinstance(value, (dict, list, tuple)):
        items = value.values() if isinstance(value, dict) else value
        return [o for v in items for o in _objects_in(v, nesting + 1)] if len(value) <= _MAX_ITEMS and nesting < 2 else []
    if isinstance(value, (*_NOT_PLAIN, *_SCALARS)) or not isinstance(getattr(value, "__dict__", None), dict):
        return []
    return [value]


_MAX_ITEMS = 64  # a longer list or dict is data, not configuration: its objects are not looked into


def _reads_training(cls: type, known: dict[type, bool]) -> bool:
    """Whether code of ``cls`` (any method, nested functions included; ``nn.Module``'s own
    excepted) mentions ``training``: only then can its ``training`` flag change what it does.
    Checking fewer flags keeps the guard cheap on deep models of simple blocks."""
    if cls not in known:
        codes = [
            value.__code__
            for klass in cls.__mro__
            if klass not in (nn.Module, object)
            for value in vars(klass).values()
            if hasattr(value, "__code__")
        ]
        known[cls] = any(_mentions(code, "training") for code in codes) or not codes
    return known[cls]


def _mentions(code: Any, word: str) -> bool:
    if word in code.co_names or word in code.co_consts:
        return True
    return any(_mentions(const, word) for const in code.co_consts if hasattr(const, "co_names"))


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    return list({id(m): m for m in modules}.values())


def _contents(container: Any) -> tuple[Any, ...]:
    if isinstance(container, dict):
        return tuple(container.items())
    return tuple(container) if isinstance(container, (list, set)) else ()


def _same(now: tuple[Any, ...], before: tuple[Any, ...]) -> bool:
    if len(now) != len(before):
        return False
    for a, b in zip(now, before):
        if isinstance(a, tuple) and isinstance(b, tuple):
            if a[0] is not b[0] and a[0] != b[0] or a[1] is not b[1]:
                return False
        elif a is not b:
            return False
    return True


# -- cache keys ------------------------------------------------------------------------------------
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def freeze(value: Any, depth: int = 0) -> Hashable:
    """A hashable key for a non-tensor argument that separates what a trace could tell apart:
    ``2`` from ``2.0`` and ``True`` from ``1.0`` (by type), and an object before and after one
    of its attributes changed (by its attributes, three levels deep; deeper, by identity)."""
    kind = type(value)
    if isinstance(value, _SCALARS):
        return (kind, repr(value) if kind is float else value)  # repr: nan == nan, -0.0 != 0.0
    if isinstance(value, enum.Enum):
        return (kind, value.name)
    if depth > 3:
        return ("id", kind, id(value))
    if isinstance(value, (tuple, list)):
        return (kind, tuple(freeze(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return (kind, tuple((freeze(k, depth + 1), freeze(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (kind, frozenset(freeze(v, depth + 1) for v in value))
    if callable(value) or not hasattr(value, "__dict__"):
        return ("id", kind, id(value))
    return (kind, tuple((k, freeze(v, depth + 1)) for k, v in sorted(vars(value).items())))


T = TypeVar("T")


def tracing_here() -> bool:
    """Whether torch.compile or torch.export is tracing the code that runs in this thread.

    ``torch.compiler.is_compiling()`` alone does not say: a non-strict ``torch.export`` sets it
    for the whole process, so while one thread exports, every other thread would skip its guard
    checks and be served graphs the model may have outdated. An export's fake tensor mode is
    active in its own thread only, and dynamo answers ``is_dynamo_compiling()`` in the frames it
    traces.
    """
    if not torch.compiler.is_compiling():
        return False
    return torch.compiler.is_dynamo_compiling() or detect_fake_mode() is not None


def traced_elsewhere() -> bool:
    """Whether another thread is inside torch.export or torch.compile now (the process-wide flag
    is set, and not by this thread). torch.export keeps global state while it traces: a second
    export started meanwhile, in any thread, breaks the first one."""
    return torch.compiler.is_compiling() and not tracing_here()


class GraphCache(Generic[T]):
    """Built graphs (or runners) by key, each with its guard, at most ``limit`` of them (LRU)."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # calls in several threads look up and drop entries at once
        self._entries: OrderedDict[Hashable, list[tuple[Guard | None, T]]] = OrderedDict()

    def lookup(self, key: Hashable) -> T | None:
        """The entry for ``key`` whose guard holds (outdated entries are dropped), else None."""
        entries = self._entries.get(key)
        if not entries:
            return None
        if tracing_here():
            return entries[-1][1]  # torch.compile guards the code it compiled itself
        found: T | None = None
        with self._lock:
            for i, (guard, value) in enumerate(entries):
                status = HOLDS if guard is None else guard.check()
                if status == HOLDS:
                    found = value
                    break
                if status == STALE:
                    entries[i] = (None, None)  # type: ignore[assignment]
            entries[:] = [e for e in entries if e[1] is not None]
            if found is not None:
                if key in self._entries:
                    self._entries.move_to_end(key)
            elif not entries:
                self._entries.pop(key, None)
        return found

    def put(self, key: Hashable, value: T, guard: Guard | None) -> None:
        with self._lock:
            self._entries.setdefault(key, []).append((guard, value))
            self._entries.move_to_end(key)
            while len(self) > self.limit:
                oldest = next(iter(self._entries))
                self._entries[oldest].pop(0)
                if not self._entries[oldest]:
                    del self._entries[oldest]

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy and pickle: a lock is neither
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def values(self) -> list[T]:
        return [value for entries in self._entries.values() for _, value in entries]
