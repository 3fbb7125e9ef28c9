"""Placing each requested name: captured by a graph or by a forward hook, and why.

``place`` is the one place that decides it, for every case: a traced model (names in the graph,
names inside its opaque or ``torch.nn`` leaves on hooks), a model whose own forward runs eagerly
(names of children traced on their own in their graphs, the rest on hooks) and ``mode="hooks"``.
The result, a ``Placement``, is data: the façade turns its fallbacks into warnings and reports,
the runner runs it, export explains from it why a name cannot be exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .._errors import TapNameError
from . import eager_ops as _eager_ops
from . import hooks as _hooks
from . import names as _names
from . import regions as _regions
from .analysis import Analysis
from .edit_placement import EditPlacement
from .edit_placement import from_regions as edits_in_regions
from .edit_placement import place as place_edits

__all__ = ["Placement", "place"]

Fallbacks = dict[str, tuple[str, str]]  # path -> (module type, reason); "" is the root


@dataclass
class Placement:
    """Where each requested name is captured.

    Attributes:
        request: ``{name: output key}``, in output order.
        analysis: the trace it was placed on (``analysis.traced`` is ``None`` when the root runs eagerly).
        fx: names computed by a graph (the model's, or a child's traced on its own) -> key.
        hooks: names captured by forward hooks -> the module call.
        reasons: name -> why it is not on a graph ("" for graph names).
        module_types: name -> the class of its module ("" for a root op).
        leaves: hooked name -> the outermost leaf of the graph that runs it ("" = none).
        fallbacks: code torch.fx could not trace: path -> (module type, reason); "" is the root.
        regions: children traced on their own under an eagerly running root.
    """

    request: dict[str, str]
    analysis: Analysis
    fx: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, _hooks.HookTarget] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)
    leaves: dict[str, str] = field(default_factory=dict)
    fallbacks: Fallbacks = field(default_factory=dict)
    regions: list[_regions.Region] = field(default_factory=list)
    edits: EditPlacement = field(default_factory=EditPlacement)  # how each edit is applied
    eager_ops: _eager_ops.EagerOps = field(default_factory=_eager_ops.EagerOps)  # ops of eager code, named as it runs

    @property
    def eager_root(self) -> bool:
        """Whether the model's own forward runs eagerly (no single graph computes the names)."""
        return self.analysis.traced is None

    @property
    def mode(self) -> Literal["fx", "mixed", "hooks"]:
        """``"fx"``: one graph computes every name; ``"hooks"``: no graph does; else ``"mixed"``."""
        if not self.eager_root and not self.hooks and not self.eager_ops.wanted:
            return "fx"
        return "mixed" if self.fx else "hooks"

    def path(self, name: str) -> Literal["fx", "hook"]:
        return "fx" if name in self.fx else "hook"

    def why_no_single_graph(self) -> str:
        """Why no one graph holds every name, and what to do ("" when one does)."""
        if self.eager_root:
            return (
                "its own forward cannot be traced, so it runs eagerly (see Tapped.report()).\n  Tap a traceable submodule "
                "instead: fxtap.tap(model.get_submodule(path), names), or make the forward traceable (docs/fallback.md)."
            )
        if self.hooks or self.edits.hooks or self.eager_ops.wanted:
            hooked = {name: self.reasons[name] for name in [*self.hooks, *self.eager_ops.wanted]} | {n: self.edits.reasons[n] for n in self.edits.hooks}
            detail = "; ".join(f"{name!r}: {reason}" for name, reason in hooked.items())
            return (
                f"some are captured or edited by hooks ({detail}).\n"
                "  Hooks cannot be exported. Tap names outside that code, or make it traceable (docs/fallback.md)."
            )
        return ""


def place(
    analysis: Analysis, request: dict[str, str], *, mode: str, note: str = "", edits: dict[str, nn.Module] | None = None
) -> Placement:
    """Give each requested name a path, or raise ``TapNameError`` for names that do not exist.
    ``edits`` (name -> edit module) are placed alike (``edit_placement``).

    Raises:
        TapNameError: some names do not exist (in ``mode="fx"``: or only hooks could reach them);
            its ``unknown`` and ``eager_root`` attributes are for the caller's hints; or some edit
            cannot be applied.
    """
    if analysis.traced is None and mode == "auto":
        return _place_under_eager_root(analysis, request, edits or {})
    try:
        placement = _place_on_graph(analysis, request, mode=mode, note=note)
    except _Unknown as error:
        known = set(analysis.names())
        error.unknown = [name for name in request if name not in known]  # for the caller's hints
        raise
    placement.edits = place_edits(analysis, edits or {}, mode=mode)
    return placement


class _Unknown(TapNameError):
    """Names that do not exist: ``unknown`` lists the names the model does not have at all (for
    hints about other modes); ``eager_root`` says whether its own forward runs eagerly."""

    def __init__(self, message: str, unknown: list[str], *, eager_root: bool) -> None:
        super().__init__(message)
        self.unknown = unknown
        self.eager_root = eager_root


def _place_on_graph(analysis: Analysis, request: dict[str, str], *, mode: str, note: str) -> Placement:
    points = analysis.traced.points if analysis.traced is not None else {}
    fx_names = {name: key for name, key in request.items() if name in points}
    targets, unknown = _hooks.hook_targets(analysis.model, [name for name in request if name not in points])
    leaves = analysis.hookable_under()
    outside = [name for name, t in targets.items() if _names.enclosing(t.path, leaves, strict=True) is None]
    unknown += list(targets) if mode == "fx" and targets else outside
    ops = _eager_ops.EagerOps()
    if mode == "auto" and unknown and analysis.traced is not None:  # ops of opaque leaves, named as they run
        hints = analysis.hints
        ops, unknown = _eager_ops.defer(analysis.model, unknown, request, analysis.fallbacks, hints.leaf_modules, hints.autowrap_functions)
    if unknown:
        raise _Unknown(_unknown_message(analysis, unknown, note), unknown, eager_root=False)
    placement = Placement(request, analysis, fx=fx_names, fallbacks=dict(analysis.fallbacks))
    placement.reasons = {name: "" for name in fx_names}
    placement.module_types = {name: points[name].module_type for name in fx_names}
    for name, target in targets.items():
        leaf = _names.enclosing(target.path, leaves, strict=True) or ""
        module_type, reason = analysis.fallbacks.get(leaf, (type(analysis.model.get_submodule(leaf)).__name__, ""))
        placement.hooks[name] = target
        placement.reasons[name] = reason or f"inside {leaf!r} ({module_type}), a torch.nn module that FX keeps as one step"
        placement.module_types[name] = type(analysis.model.get_submodule(target.path)).__name__
        placement.leaves[name] = _names.enclosing(target.path, leaves, strict=True, innermost=False) or ""
    placement.eager_ops = ops
    for name, scope in ops.wanted.items():
        placement.reasons[name] = _eager_ops.reason(analysis.model, scope)
        placement.module_types[name] = type(analysis.model.get_submodule(scope)).__name__
        placement.leaves[name] = _names.enclosing(scope, leaves, innermost=False) or scope  # the graph must run that leaf
    return placement


def _place_under_eager_root(analysis: Analysis, request: dict[str, str], edits: dict[str, nn.Module]) -> Placement:
    """The root runs eagerly; traceable children holding requested or edited names are traced on their own."""
    model = analysis.model
    found = _regions.resolve(model, list(request) + [n for n in edits if n not in request], analysis.fallbacks[""], hints=analysis.hints)
    placed_edits = edits_in_regions(found, edits, request)  # edit-only names leave what is captured
    hints = analysis.hints
    taps = [name for name in request if name not in edits]  # an op of eager code cannot be edited: it stays unknown
    ops, found.unknown = _eager_ops.defer(model, found.unknown, taps, found.fallbacks, hints.leaf_modules, hints.autowrap_functions)
    if found.unknown:
        available = found.available + [p for p, _ in model.named_modules() if p and p not in found.available]
        message = _names.unknown_name_message(found.unknown, type(model).__name__, available)
        raise _Unknown("\n".join([message, *_hooks.alias_hints(model, found.unknown)]), found.unknown, eager_root=True)
    placement = Placement(request, analysis, fallbacks=found.fallbacks, regions=found.regions, edits=placed_edits, eager_ops=ops)
    placement.fx = {name: request[name] for name in found.fx}
    placement.hooks = found.hooks
    placement.reasons = {name: "" for name in found.fx}
    placement.module_types = dict(found.fx)
    for name, target in found.hooks.items():
        owner = _names.enclosing(target.path, found.fallbacks) or ""
        placement.reasons[name] = found.fallbacks[owner][1]
        placement.module_types[name] = type(model.get_submodule(target.path)).__name__
    for name, scope in ops.wanted.items():
        placement.reasons[name] = _eager_ops.reason(model, scope)
        placement.module_types[name] = type(model.get_submodule(scope)).__name__
    return placement


def _unknown_message(analysis: Analysis, unknown: list[str], note: str) -> str:
    model: nn.Module = analysis.model
    message = _names.unknown_name_message(unknown, type(model).__name__, analysis.names(), note)
    hints = []
    for name in unknown:
        near = _hooks.nearest_module(model, name)
        if analysis.traced is None and near:
            hints.append(
                f"  {name!r} is not a module call, and hooks capture module outputs only: "
                f"the nearest module whose output can be hooked is {near!r}."
            )
        elif analysis.traced is not None and (target := _hooks.hook_targets(model, [name])[0].get(name)):
            if _names.enclosing(target.path, analysis.hookable_under(), strict=True) is not None:
                hints.append(f"  {name!r} is inside a module FX keeps as one step; mode=\"auto\" captures it with a hook.")
            elif target.call_index == 0:
                hints.append(
                    f"  {name!r} is a module that forward never calls (a ModuleList or ModuleDict is iterated, "
                    "not called), so it has no output of its own: tap its children."
                )
    return "\n".join([message, *hints, *_hooks.alias_hints(analysis.model, unknown)])
