"""torch.export as the second frontend: one graph for a model whose own forward FX cannot trace.

When the root's ``forward`` cannot be traced symbolically (every Hugging Face model), the model
runs eagerly, with the children that hold requested names traced on their own (``regions``) and
hooks for the rest (``runner.EagerRunner``). That call, names and all, is plain Python around
torch ops, which non-strict ``torch.export`` can record: ``ExportRunner`` exports *the tapped call
itself* (a wrapper whose forward is ``EagerRunner``'s, returning the dict of requested values),
with the call's actual arguments. Every name therefore means exactly what it means in mixed mode,
by construction: the same hooks, the same region graphs and the same naming (``names.Replay``)
run while export records them, and a value that the eager code would overwrite in place is the
same copy (hooks and regions copy what they capture) in the exported graph.

The first call with a new input signature runs as in mixed mode and then exports; later calls
with that signature run the exported graph, whose parameters and buffers are the model's own
tensors. Export is refused, and mixed mode stays, when it would not be the same computation:
user or global hooks (a graph would bake in what they do), a forward that writes Python
attributes (a graph cannot), autocast or inference mode at the call, arguments that are not
tensors or simple values, or any exception from ``torch.export``. A guard (``guard.watch`` over
every module, parameter and buffer) rebuilds the graph when the model changes.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TextIO

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._errors import summary
from . import fx as _fx
from . import guard as _guard
from . import prune as _prune
from .edit import Patch
from .export_edits import edit_modules, edit_refusal
from .export_edits import edit_paths as _edit_paths
from .export_edits import meta as _meta
from .hazards import global_hooks, rng_state_set_raises, user_hooks
from .masks import eager_shortcuts
from .model import buffer_values_kept, cuda_devices, preserved, structural_twin
from .outputs import Outputs, made_before
from .placement import Placement
from .runner import EagerRunner

__all__ = ["ExportRunner", "applies", "metas_hold", "model_guard", "tensor_metas"]


def applies(placement: Placement, mode: str) -> bool:
    """Whether ``placement`` may run as one exported graph: the root runs eagerly in
    ``mode="auto"`` (edits included: ``edit_refusal`` says which keep mixed mode, and why)."""
    return mode == "auto" and placement.eager_root


class _Entry(NamedTuple):
    """The exported graph for one input signature, or why there is none."""

    module: nn.Module | None  # ``ExportedProgram.module()``: takes the model's arguments, returns the tensors
    reason: str  # why there is no graph ("" when there is one)
    outputs: Outputs | None = None  # how the dict is rebuilt around the graph's tensors
    shapes: _Shapes | None = None  # which input shapes the graph serves
    # each tensor the graph reads (the model's parameters and buffers, the tensor edits), with the
    # shape, dtype and device baked in: ``model.to(torch.bfloat16)`` keeps the Parameter objects
    baked: tuple[tuple[torch.Tensor, Any], ...] = ()
    example: tuple[pytree.TreeSpec, tuple[Any, ...]] | None = None  # the call's structure; its tensors as (shape, dtype, device)

    def fits(self, leaves: list[Any]) -> bool:
        if not metas_hold(self.baked):  # ``.to()``, ``.data =``: another graph
            return False
        return self.shapes is None or self.shapes.fit(leaves)

    def __call__(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        if self.module is None or self.outputs is None:
            raise AssertionError("expected an exported graph, found none")
        return self.outputs.rebuild(self.module(*tensors))


class ExportRunner(EagerRunner):
    """Mixed mode for the first call of each input signature, one exported graph after it."""

    def __init__(self, placement: Placement, *, keep_output: bool, detach: bool) -> None:
        super().__init__(placement, keep_output=keep_output, detach=detach)
        # per input structure (ranks, dtypes, simple values), the graphs built so far: each
        # serves the shapes it was exported for (dynamic dimensions within their range)
        self._graphs: _guard.GraphCache[list[_Entry]] = _guard.GraphCache()
        self._last: _Entry | None = None  # what the last call ran
        self._served: _Entry | None = None  # the graph of the last call's signature (built by that call, or run), or why none
        self.edits = edit_modules(placement)  # submodules of the exported call: their tensors are the graph's
        self._edit_refusal = edit_refusal(placement)

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if _guard.tracing_here():  # torch.compile or an export traces the tapped call itself: mixed mode, as before
            return super().run(model, args, kwargs)
        key = _signature(args, kwargs) if not self._edit_refusal else self._edit_refusal
        if isinstance(key, str):
            self._last = self._served = _Entry(None, key)
            return super().run(model, args, kwargs)
        tensors = _tensor_leaves(args, kwargs)  # the graph's inputs (the rest of the arguments is in the key)
        entry = self._find(key, tensors)
        if entry is None and _guard.traced_elsewhere():  # exporting now would break the other thread's trace
            self._last = self._served = _Entry(None, _ELSEWHERE)
            return super().run(model, args, kwargs)
        if entry is None:
            with _fx.exclusive():  # concurrent first calls export once
                entry = self._find(key, tensors)
                if entry is None:
                    # the whole forward, so that every region graph the export will run exists
                    before = _attributes(model, self.edits)
                    out = self._run(model, args, kwargs, stop_early=False)
                    written = _written(before)  # seen eagerly already: no export to try
                    entry = _Entry(None, _WRITES.format(written)) if written else self._export(model, args, kwargs)
                    shelf = self._graphs.lookup(key)
                    if shelf is None:
                        shelf = []
                        self._graphs.put(key, shelf, model_guard(model, self.edits))
                    shelf.insert(0, entry)  # newest first; a refusal without shapes serves every call
                    if sum(e.module is not None for e in shelf) == _MAX_GRAPHS:  # sizes export could not keep dynamic
                        shelf.append(_Entry(None, f"torch.export not used: {_MAX_GRAPHS} graphs for other sizes of these inputs exist already"))
                    # this call ran in mixed mode: say so, and what the next calls will run
                    self._last = _Entry(None, _BUILT) if entry.module is not None else entry
                    self._served = entry
                    return out
        self._last = self._served = entry
        if entry.module is None:
            return super().run(model, args, kwargs)
        return entry(tensors)

    def _find(self, key: Hashable, leaves: list[Any]) -> _Entry | None:
        shelf = self._graphs.lookup(key)  # None when the model changed since (the guard)
        return next((entry for entry in shelf if entry.fits(leaves)), None) if shelf else None

    def eager(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call in mixed mode (the exported graph's truth), whatever the graphs built."""
        return super().run(model, args, kwargs)

    # -- what the last call did ------------------------------------------------------------------
    @property
    def last(self) -> _Entry | None:
        """The exported graph of the last call's input signature (that call built it, or ran it),
        or why there is none (``None`` before any call)."""
        return self._served

    @property
    def exported(self) -> bool:
        """Whether the last call ran an exported graph."""
        return self._last is not None and self._last.module is not None

    @property
    def mode(self) -> str:
        return "export" if self.exported else self.placement.mode

    def path(self, name: str) -> str:
        return "export" if self.exported else self.placement.path(name)

    def reason(self, name: str) -> str:
        reason = self.placement.reasons.get(name, "")
        note = self.note
        return note if self.exported else f"{reason}; {note}" if reason and note else reason or note

    @property
    def note(self) -> str:
        """What the last call ran: one torch.export graph and why, or why not ("" before a call)."""
        if self.exported:
            root_type, why = self.placement.fallbacks[""]
            return f"one torch.export graph (torch.fx cannot trace {root_type} itself: {why})"
        return self._last.reason if self._last is not None else ""

    # -- building --------------------------------------------------------------------------------
    twin_of: tuple[Any, dict[str, nn.Module]] | None = None  # (build(model, edits) -> runner, the edits): set by ``build``

    def _twin(self, model: nn.Module) -> tuple[nn.Module, ExportRunner]:
        """A structural twin of ``model`` (and of the edit modules) and the same request's runner on it."""
        if self.twin_of is None:
            raise AssertionError("an ExportRunner is made by _capture.build, which says how to build it again")
        build_on, edits = self.twin_of
        memo: dict[int, nn.Module] = {}
        twin = structural_twin(model, memo)
        runner = build_on(twin, {name: structural_twin(module, memo) for name, module in edits.items()})
        if not isinstance(runner, EagerRunner):
            raise AssertionError(f"the twin of {type(model).__name__} did not run eagerly")
        return twin, runner  # type: ignore[return-value]

    def _export(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
        refused = _refusal(model, self.edits)
        if refused:
            return _Entry(None, f"torch.export not tried: {refused}")
        devices = cuda_devices(_tensors(model, args, kwargs))
        try:
            # export may draw from the RNG while it traces: the user's generator must not notice
            with torch.random.fork_rng(devices=devices), preserved(model), _quiet():
                # torch.export swaps the parameters of what it traces for fake tensors while it
                # runs: it traces a twin (the same tensors, its own dicts), so that no other
                # thread calling the model meanwhile sees them
                twin, runner = self._twin(model)
                with _warm_up(twin, args, kwargs) as (twin_args, twin_kwargs):  # builds the twin's region graphs
                    runner._run(twin, twin_args, twin_kwargs, stop_early=False)
                call, program = _exported(runner, twin, args, kwargs)
                # its code may not compile (a submodule named ``in``)
                module = _pruned(program.module(), _copied(self.placement, call.__dict__["_found"].outputs))
        except Exception as error:  # noqa: BLE001 - the one place the export frontend decides to fall back
            return _Entry(None, f"torch.export failed: {summary(error)}")
        written = call.__dict__["_found"].written
        if written:
            return _Entry(None, _WRITES.format(written))
        tensors = _tensor_leaves(args, kwargs)
        shapes = _Shapes.of(module, program, tensors)
        if not shapes.fit(tensors):  # sizes related by expressions fxtap does not solve: this call's shapes only
            shapes = _Shapes.exact(tensors)
        baked = tensor_metas(model, self.edits)
        example = pytree.tree_flatten((args, kwargs))
        leaves = tuple(_meta(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in example[0])
        return _Entry(module, "", call.__dict__["_found"].outputs, shapes, baked, (example[1], leaves))


@contextmanager
def _warm_up(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """A call that leaves no trace: on copies of the inputs (the forward may write into them), with
    the buffers' values put back afterwards (the twin shares them with the model)."""
    copies = pytree.tree_map(lambda v: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v, (args, kwargs))
    with buffer_values_kept(model):
        yield copies


def _exported(runner: ExportRunner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Call, Any]:
    """The program of the tapped call: every tensor dimension dynamic where torch.export can keep
    it so (``Dim.AUTO``: it specializes the rest), else with this call's static shapes."""
    tensors = tuple(_tensor_leaves(args, kwargs))
    dims = tuple(dict.fromkeys(range(t.dim()), torch.export.Dim.AUTO) for t in tensors)
    with eager_shortcuts():
        try:
            call = _Call(runner, model, args, kwargs)
            return call, torch.export.export(call, tensors, dynamic_shapes={"args": dims}, strict=False)
        except Exception as error:  # a static export may still work; its error is the one reported
            if "data-dependent" in str(error) or "data dependent" in str(error):
                raise  # a branch on a value: static sizes do not help, and another try costs as much
            call = _Call(runner, model, args, kwargs)
            return call, torch.export.export(call, tensors, strict=False)


@contextmanager
def _quiet() -> Iterator[None]:
    """Nothing that torch.export writes to stderr from this thread reaches it: a failed try
    prints its partial graph and logs symbolic-shape warnings (torch's log handlers write to
    ``sys.stderr``), and fxtap reports the failure itself, in one line of ``report()``. Other
    threads write as usual."""
    muted = _Muted(sys.stderr, threading.get_ident())
    sys.stderr = muted
    try:
        yield
    finally:
        if sys.stderr is muted:  # unless someone replaced it meanwhile
            sys.stderr = muted.stream


class _Muted:
    """A stderr that drops what one thread writes."""

    def __init__(self, stream: TextIO, thread: int) -> None:
        self.stream, self.thread = stream, thread

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() == self.thread else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _pruned(module: Any, copied: list[int]) -> Any:
    """The graph without what no requested value needs (the rest of the forward, copies of values
    not asked for), without torch.export's dtype checks and eval-mode dropouts (identities),
    and without the copies that hooks took where the graph shows that nothing
    writes into the value afterwards (``copied``: their output positions). torch.fx's own rule
    keeps every op that writes into a tensor or draws from the RNG (state the eager forward
    changes); torch.export's guard function is kept too."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)  # dtype and device checks: the key and ``tensor_metas`` check them per call
        elif node.target is torch.ops.aten.dropout.default and _argument(node, 2, "train") is False:
            node.replace_all_uses_with(node.args[0])  # an eval-mode dropout returns its input
            graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.op == "call_module" or node.is_impure())
    _prune.drop_copies(graph, module, copied)
    module.recompile()
    return module


def _argument(node: torch.fx.Node, position: int, name: str) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def _copied(placement: Placement, outputs: Outputs | None) -> list[int]:
    """The graph output positions of the requested values, each of which is a copy fxtap took
    (hooks, region outputs and eager ops copy what they capture) or the op itself. A name whose op
    is a ``clone`` is left out: that clone may be the model's own op, not a copy to drop."""
    keys = {key for name, key in placement.request.items() if not _CLONE_OP.search(name)}
    positions = outputs.positions() if outputs is not None else {}
    return [p for key, found in positions.items() if key in keys for p in found]


_CLONE_OP = re.compile(r"(^|\.)clone(_\d+)?$")


class _Shapes(NamedTuple):
    """The input shapes an exported graph serves: per input leaf, per dimension, a size or a
    symbol (with its range); a symbol means the same size wherever it appears."""

    dims: tuple[tuple[Any, ...] | None, ...]  # per leaf: its dimensions, None for a non-tensor
    ranges: dict[Any, tuple[int, float]]  # symbol -> (lowest, highest) size
    guards: Any  # the graph's own guard function (torch.export's), also checked

    @classmethod
    def of(cls, module: nn.Module, program: Any, leaves: list[Any]) -> _Shapes:
        graph = module.graph
        if not isinstance(graph, torch.fx.Graph):
            return cls.exact(leaves)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(leaves):
            return cls.exact(leaves)
        dims: list[tuple[Any, ...] | None] = []
        for node in placeholders:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                dims.append(None)
                continue
            dims.append(tuple(d if isinstance(d, int) else d.node.expr for d in value.shape))
        ranges = {symbol: (int(r.lower), float(r.upper)) for symbol, r in program.range_constraints.items()}
        return cls(tuple(dims), ranges, getattr(module, "_guards_fn", None))

    @classmethod
    def exact(cls, leaves: list[Any]) -> _Shapes:
        return cls(tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves), {}, None)

    def fit(self, leaves: list[Any]) -> bool:
        if len(leaves) != len(self.dims):
            return False
        bound: dict[Any, int] = {}
        for leaf, dims in zip(leaves, self.dims):
            if dims is None:
                continue
            if leaf.dim() != len(dims):
                return False
            for size, dim in zip(leaf.shape, dims):
                if isinstance(dim, int):
                    if size != dim:
                        return False
                elif dim not in self.ranges or bound.setdefault(dim, size) != size:
                    return False  # an expression of symbols, or a symbol of two sizes
                elif not self.ranges[dim][0] <= size <= self.ranges[dim][1]:
                    return False
        if self.guards is not None:
            try:
                self.guards(*leaves)
            except Exception:  # noqa: BLE001 - torch.export's guard failed: another graph
                return False
        return True


class _Call(nn.Module):
    """What torch.export records: the tapped call itself, returning the dict of requested values."""

    def __init__(self, runner: ExportRunner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model  # a submodule: the graph reads the model's own parameters and buffers
        if runner.edits:  # so are the edit modules: their parameters train, a tensor edit is read live
            self.edits = nn.ModuleList(runner.edits)
        # torch.export puts back the plain attribute values of the modules it traced: what the
        # forward learns goes to an object of its own, which export leaves alone
        self.__dict__["_runner"], self.__dict__["_found"] = runner, _Found()
        self.__dict__["_found"].call = pytree.tree_flatten((args, kwargs))

    def forward(self, *args: torch.Tensor) -> list[Any]:
        """Takes the call's tensors alone (its other arguments are fixed: they are in the key)."""
        found: _Found = self.__dict__["_found"]
        given = iter(args)
        leaves, spec = found.call
        args, kwargs = pytree.tree_unflatten([next(given) if isinstance(v, torch.Tensor) else v for v in leaves], spec)
        runner: ExportRunner = self.__dict__["_runner"]
        before = _attributes(self.model, runner.edits)
        with rng_state_set_raises():  # a forward that puts the generator's state back: mixed mode
            out = runner._run(self.model, args, kwargs, stop_early=False)
        found.written = _written(before)
        found.outputs, computed = Outputs.split(out, made_before(self.model, found.call[0]))
        return computed


class _Found:
    """What the traced forward found: an attribute it rebinds (torch.export's own writes do not
    count) and the structure of its output."""

    written = ""
    outputs: Outputs | None = None
    call: tuple[list[Any], pytree.TreeSpec]  # the leaves of the arguments, and their structure


_SIMPLE = (type(None), bool, int, float, str)
_BUILT = "this first call with these input shapes ran in mixed mode; it was exported, and the next calls run one torch.export graph"
_ELSEWHERE = "torch.export not tried for this call: another thread was inside torch.export or torch.compile, whose global state a second trace breaks; a later call exports"
_MAX_GRAPHS = 4  # exported graphs per input structure; calls of other sizes run in mixed mode
_WRITES = "torch.export not used: the forward writes the attribute {} (Python-side state that a graph cannot record)"


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | str:
    """The key of the graph for this call (shapes, dtypes, devices, simple values, the grad mode,
    the default dtype and device), or why no exported graph serves it."""
    if torch.is_inference_mode_enabled():
        return "torch.export not used: the call runs in inference mode"
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return "torch.export not used: the call runs under autocast"
    leaves, spec = pytree.tree_flatten((args, kwargs))
    items: list[Hashable] = []
    for leaf in leaves:
        if type(leaf) in (torch.Tensor, nn.Parameter):
            items.append((leaf.dim(), leaf.dtype, leaf.device, leaf.layout, leaf.requires_grad))  # sizes: _Shapes
        elif type(leaf) in _SIMPLE:
            items.append((type(leaf).__name__, leaf))
        else:
            why = f"an argument is a {type(leaf).__name__}, not a tensor or a simple value"
            if hasattr(leaf, "__dict__"):  # a transformers cache passed as past_key_values, for one
                why += " (a graph cannot take an object of the caller's, which the forward reads and updates in place)"
            return f"torch.export not used: {why}"
    # the graph bakes in the dtype and device of tensors the forward makes without naming them (torch.ones(n))
    return (str(spec), tuple(items), torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_default_device())


def _refusal(model: nn.Module, edits: list[nn.Module]) -> str:
    """Why the model must not be exported as it is ("" when it may)."""
    found = global_hooks()
    if found:
        return f"global module hooks are registered ({found}), and a graph would bake in what they do"
    for path, module in [*model.named_modules(), *_edit_paths(edits)]:
        hooks = user_hooks(module)
        if hooks:
            return f"{hooks} registered on {path or 'the model itself'!r}, and a graph would bake in what they do"
    return ""


_Snapshot = list[tuple[str, dict[str, Any], dict[str, Any], dict[str, list[Any]]]]


def _attributes(model: nn.Module, edits: list[nn.Module]) -> _Snapshot:
    """Every module's attributes (the edits' too), and the items of those that are lists, dicts
    or sets (a cache)."""
    return [
        (path, m.__dict__, dict(m.__dict__), {k: _items(v) for k, v in m.__dict__.items() if type(v) in (list, dict, set)})
        for path, m in [*model.named_modules(), *_edit_paths(edits)]
    ]


def _items(container: Any) -> list[Any]:
    return [x for pair in container.items() for x in pair] if isinstance(container, dict) else list(container)


def _written(before: _Snapshot) -> str:
    """The first module attribute the forward rebound, added, or filled ("" when none)."""
    for path, now, then, contents in before:
        for key in now.keys() | then.keys():
            value = now.get(key, _written)
            changed = key in contents and (len(_items(value)) != len(contents[key]) or any(a is not b for a, b in zip(_items(value), contents[key])))
            if key != "forward" and (value is not then.get(key, _written) or changed):
                return repr(f"{path}.{key}" if path else key)
    return ""


def _tensor_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]


def _tensors(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves((args, kwargs))
    return [t for t in [*leaves, *model.parameters(), *model.buffers()] if isinstance(t, torch.Tensor)]


def tensor_metas(model: nn.Module, edits: list[nn.Module]) -> tuple[tuple[torch.Tensor, Any], ...]:
    """Every tensor an exported graph reads (the parameters and buffers of the model and the
    edits, the tensor edits) with its shape, dtype and device, which the graph bakes in. The
    guard sees a swapped tensor; ``model.to(torch.bfloat16)`` or ``param.data = ...`` keep the
    Parameter object and change only these (``metas_hold``)."""
    patches = [t for m in edits if isinstance(m, Patch) and isinstance(t := m.tensor, torch.Tensor)]
    read = {id(t): t for m in (model, *edits) for t in (*m.parameters(), *m.buffers())} | {id(t): t for t in patches}
    return tuple((t, _meta(t)) for t in read.values())


def metas_hold(metas: tuple[tuple[torch.Tensor, Any], ...]) -> bool:
    """Whether every tensor of ``tensor_metas`` still has its shape, dtype and device."""
    return all(_meta(tensor) == meta for tensor, meta in metas)


def model_guard(model: nn.Module, edits: list[nn.Module]) -> _guard.Guard:
    """Every module, parameter and buffer (the edits' too): a graph traced through all of them
    (the exported call's, a cut's) is outdated when one of them is swapped or changes its mode."""
    root = model
    if edits:  # one tree for the guard: a holder of its own, the model is not changed
        root = nn.Module()
        root.model, root.edits = model, nn.ModuleList(edits)
    paths = [path for path, _ in root.named_modules() if path]
    state = [name for name, _ in [*root.named_parameters(), *root.named_buffers()]]
    return _guard.watch(root, paths, [], False, state)
