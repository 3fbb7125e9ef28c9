"""The capture engine: tracing, placing each tap name on the graph or on a hook, and running it.

It imports nothing above it (``fxtap._tap``, ``_compare``, ``_deploy`` and the CLI use it), only
``fxtap._errors`` and ``fxtap._values``. Its contract, for every caller outside it:

- ``describe(model, train=..., mode=...)``: every tap name with its kind, module type and path;
- ``locate(model, name)``: the trace whose graph holds the node of ``name``;
- ``produced(model, args, kwargs, ...)``: the tap names that one call produces (``produced.py``);
- ``analyse`` / ``assign`` / ``Runner``: the steps ``fxtap.tap`` builds a call from (see
  docs/architecture.md for how a call flows).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from .._errors import TapNameError
from . import eager_ops as _eager_ops
from . import export as _export
from . import fx as _fx
from . import produced as _produced
from . import regions as _regions
from .analysis import Analysis, analyse
from .call_spec import CallSpecs, default_concrete_args, depends_on_arguments
from .edit import as_modules as edit_modules
from .fx import NO_HINTS, Hints, Traced, exclusive, realize
from .hooks import HookTarget, hook_targets
from .model import in_mode, unwrap
from .names import inside as _names_inside
from .names import normalize_request
from .placement import Placement, place
from .runner import Runner, make_runner

__all__ = [
    "NO_HINTS",
    "Analysis",
    "Hints",
    "HookTarget",
    "Located",
    "NameInfo",
    "Placement",
    "Runner",
    "analyse",
    "build",
    "depends_on_arguments",
    "describe",
    "edit_modules",
    "exclusive",
    "hook_targets",
    "locate",
    "normalize_request",
    "listed",
    "produced",
    "realize",
    "unwrap",
]


class NameInfo(NamedTuple):
    """One tap name of a model, as ``describe`` lists it."""

    name: str
    kind: str  # "module", "op", "input" or "attribute"
    module_type: str  # the module's class for "module", else the class whose forward ran the op ("" when unknown)
    path: str  # "fx" (a graph computes it) or "hook" (a forward hook captures it)


class Located(NamedTuple):
    """The trace whose graph holds a name's node."""

    traced: Traced
    path: str  # the traced module's path ("" = the model itself)
    module: nn.Module


def describe(
    model: nn.Module, *, train: bool = False, mode: str = "auto", hints: Hints = NO_HINTS, concrete_args: dict[str, Any] | None = None
) -> list[NameInfo]:
    """Every tap name of ``model`` in train or eval mode, in graph order (FX names first, then
    the names only hooks reach), with the non-tensor arguments at their defaults (or at
    ``concrete_args``)."""
    model = unwrap(model)
    if model.training != train or any(m.training != train for m in model.modules()):
        model = in_mode(model, train)  # the user's model keeps its mode: another thread may be running it
    # the engine never warns: its callers decide what to say
    args = default_concrete_args(model) if concrete_args is None else concrete_args
    analysis = analyse(model, mode=mode, concrete_args=args, hints=hints)
    if analysis.traced is not None or mode != "auto":
        graph_names: dict[str, tuple[str, str]] = (
            {n: (p.kind, p.module_type) for n, p in analysis.traced.points.items()} if analysis.traced is not None else {}
        )
        ordered = analysis.names()
    else:
        found = _regions.resolve(model, [], analysis.fallbacks[""], everything=True, hints=hints)
        graph_names = {n: ("", "") for n in found.available}  # kinds and types below, as hooks see them
        known = set(found.available)
        ordered = found.available + [path for path in analysis.names() if path not in known and not _read_by_graph(path, found)]
    # one pass over the model's paths for every name whose kind hooks decide (a module call or not)
    targets, _ = hook_targets(model, [n for n in ordered if not graph_names.get(n, ("", ""))[0]])
    infos = []
    for name in ordered:
        target = targets.get(name)
        module_type = type(model.get_submodule(target.path)).__name__ if target is not None else ""
        if name not in graph_names:
            infos.append(NameInfo(name, "module", module_type, "hook"))
        elif graph_names[name][0]:
            infos.append(NameInfo(name, *graph_names[name], "fx"))
        else:  # found by a child's own trace: a module call, or an op
            infos.append(NameInfo(name, "module" if target is not None else "op", module_type, "fx"))
    return infos


def _read_by_graph(path: str, found: _regions.Resolution) -> bool:
    """Whether a traced child's graph decides if the module at ``path`` is called: it lies inside
    that child, and not inside a submodule the graph calls as a whole (whose code runs eagerly).
    Its graph does not call it (else ``path`` would be among its names), as under a traced root:
    a dropout that fused attention skips (BertSelfAttention, GPT2Attention) is not listed."""
    inside = [r for r in found.traced if _names_inside(path, r) and path != r]
    if not inside:
        return False
    region = max(inside, key=len)
    return not any(_names_inside(path, opaque) and _names_inside(opaque, region) and opaque != region for opaque in found.fallbacks if opaque)


def locate(model: nn.Module, name: str, *, concrete_args: dict[str, Any] | None = None) -> Located | None:
    """fxtap's trace whose graph holds the node of ``name`` (the model's own, or that of a child
    traced on its own under an eagerly running root); ``None`` when no graph holds it."""
    model = unwrap(model)
    args = default_concrete_args(model) if concrete_args is None else concrete_args
    analysis = analyse(model, mode="auto", concrete_args=args)
    if analysis.traced is not None:
        return Located(analysis.traced, "", model) if name in analysis.traced.points else None
    found = _regions.resolve(model, [name], analysis.fallbacks[""])
    for region in found.regions:
        if name in region.wanted:
            local = _regions.trace_alone(region.module)
            if local is not None:
                return Located(local, region.path, region.module)
    return None


def build(
    model: nn.Module,
    request: dict[str, str],
    *,
    mode: str,
    concrete_args: dict[str, Any] | None,
    keep_output: bool,
    detach: bool,
    note: str = "",
    edits: dict[str, nn.Module] | None = None,
    hints: Hints = NO_HINTS,
) -> Runner:
    """Trace ``model`` for one call spec, place every requested name, and return the runner
    (its ``placement`` says where each name is captured and what fell back, and why).

    Raises:
        TapNameError: a name does not exist (``error.unknown``: the names the model has not;
            ``error.eager_root``: whether the model's own forward runs eagerly).
        TraceFailedError: ``mode="fx"`` and some code cannot be traced.

    ``edits`` (name -> module, see ``edit.as_modules``) replace values: in the graph where it
    holds them, else by forward hooks on module outputs; ``placement.edits`` says which.
    """
    with _fx.gc_paused():  # building allocates a few objects per node: see gc_paused
        # FX writes the code of the graph it builds anyway: the traced graph's code is written
        # (and a failure blamed on a module, which then falls back) only when that fails
        for write_code in (False, True):
            analysis = analyse(model, mode=mode, concrete_args=concrete_args, hints=hints, write_code=write_code)
            placement = place(analysis, request, mode=mode, note=note, edits=edits or {})
            graph = None
            if analysis.traced is None or mode == "hooks":
                break
            leaves = frozenset(placement.leaves.values())
            try:
                graph = _fx.build(
                    analysis.traced, placement.fx, keep_output=keep_output, detach=detach, run_modules=leaves, edits=placement.edits.fx
                )
                break
            except _fx.Unwritten:
                continue
    if graph is None and _export.applies(placement, mode):  # one torch.export graph from the first call on, if it exports
        runner = _export.ExportRunner(placement, keep_output=keep_output, detach=detach)

        def twin(model: nn.Module, edits: dict[str, nn.Module]) -> Runner:  # the same request, on a twin of the model
            return build(model, request, mode=mode, concrete_args=concrete_args, keep_output=keep_output, detach=detach, edits=edits, hints=hints)

        runner.twin_of = (twin, dict(edits or {}))
        return runner
    return make_runner(placement, graph, keep_output=keep_output, detach=detach)


def listed(model: nn.Module, *, train: bool, mode: str = "auto", hints: Hints = NO_HINTS) -> list[str]:
    """``fxtap.names(model)``: ``describe``'s names, except the modules of eagerly running code
    that a call with the example inputs the model offers (``dummy_inputs``, as every Hugging Face
    model has) does not call. Which modules eager code calls cannot be read from the code (a
    dropout that fused attention skips, an embedding the forward never uses); without such an
    example, or when the call fails, every module under that code is listed."""
    infos = describe(model, train=train, mode=mode, hints=hints)
    eager = {info.name for info in infos if info.kind == "module" and info.path == "hook"}
    example = _produced.offered_example(unwrap(model)) if eager else None
    if example is None:
        return [info.name for info in infos]
    try:
        called = set(produced(model, (), example, train=train, mode=mode, hints=hints))
    except Exception:  # noqa: BLE001 - the offered example does not fit the forward: what the code says stands
        return [info.name for info in infos]
    return [info.name for info in infos if info.name not in eager or info.name in called]


def produced(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, train: bool, mode: str = "auto", hints: Hints = NO_HINTS
) -> list[str]:
    """The tap names that one call of ``model`` (in train or eval mode) with these arguments
    produces, as ``tap`` runs it: ``describe``'s names that the call produced, in its order,
    with later calls (``blk_1``) after earlier ones. The model is run once, left as it was."""
    model = in_mode(unwrap(model), train)  # a twin: the user's model keeps its mode and attribute dicts
    calls = CallSpecs(model)
    concrete = dict(calls.spec(args, kwargs, checked=calls.default))
    listed = [info.name for info in describe(model, train=train, mode=mode, hints=hints, concrete_args=concrete)]
    request = dict.fromkeys(listed, "")
    while True:  # a name listed for the default arguments may not exist for this call's
        try:
            with exclusive():
                runner = build(model, {n: n for n in request}, mode=mode, concrete_args=concrete, keep_output=False, detach=True, hints=hints)
            break
        except TapNameError as error:
            unknown = set(getattr(error, "unknown", ())) & set(request)
            if not unknown:
                raise
            request = {n: "" for n in request if n not in unknown}
    with _produced.untouched(model, args, kwargs):
        recorder = _produced.record(runner, model, args, kwargs)
    found = _produced.ordered(_produced.checked(recorder, model, runner.placement), listed)
    if mode == "hooks":  # the names of eagerly run code's own ops need the graph path's naming
        return found
    with _produced.untouched(model, args, kwargs):  # the own ops of code that runs eagerly (eager_ops)
        ops = _eager_ops.op_names(model, args, kwargs, hints=hints)
    known = set(found)
    return found + [name for name in ops if name not in known]
