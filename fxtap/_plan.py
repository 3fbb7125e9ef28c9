"""Deciding how each requested name is captured: FX where the code traces, hooks where it does not.

``analyse`` traces a model, and when a submodule's code cannot be traced, makes that submodule
an opaque leaf and traces again, so that only untraceable code is left to hooks. ``assign``
then gives every requested name its path. Fallback is decided here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import _fx, _hooks, _names
from ._errors import TapNameError, TraceFailedError

__all__ = ["Analysis", "Assignment", "analyse", "assign"]


@dataclass
class Analysis:
    """What tracing found: the traced graph (``None`` when the root's own code fails) and why
    each opaque submodule is opaque (``""`` is the root)."""

    model: nn.Module
    traced: _fx.Traced | None
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (module type, reason)

    def hookable_under(self) -> list[str]:
        """Paths of the leaves (opaque or standard ``torch.nn``) whose inner modules hooks can reach."""
        if self.traced is None:
            return [""]
        leaves = {str(node.target) for node in self.traced.graph.nodes if node.op == "call_module"}
        return sorted(leaves | set(self.fallbacks))

    def names(self) -> list[str]:
        """Every name this analysis can deliver, FX names first (graph order), then hookable ones."""
        fx_names = list(self.traced.points) if self.traced is not None else []
        known = set(fx_names)
        leaves = set(self.hookable_under())
        hookable = [
            path for path, _ in self.model.named_modules() if path and path not in known and _under_any(path, leaves)
        ]
        return fx_names + hookable


def _under_any(path: str, leaves: set[str]) -> bool:
    """Whether ``path`` lies strictly inside one of ``leaves`` ("" holds everything)."""
    if "" in leaves:
        return True
    parts = path.split(".")
    return any(".".join(parts[:cut]) in leaves for cut in range(1, len(parts)))


def _inside(path: str, leaf: str) -> bool:
    return leaf == "" or path.startswith(leaf + ".")


def analyse(
    model: nn.Module,
    *,
    mode: str,
    concrete_args: dict[str, Any] | None,
    fallbacks: dict[str, tuple[str, str]] | None = None,
) -> Analysis:
    """Trace ``model``; in ``mode="auto"`` make each untraceable submodule a leaf and retry.

    Args:
        fallbacks: submodules to keep opaque from the start (path -> (type, reason)), so that a
            new trace of the same model puts the same names on hooks.

    Raises:
        TraceFailedError: in ``mode="fx"``, naming the untraceable submodule.
    """
    if mode == "hooks":
        return Analysis(model, None, {"": (type(model).__name__, 'mode="hooks" was asked for')})
    fallbacks = {path: why for path, why in (fallbacks or {}).items() if path}
    leaves: dict[str, nn.Module] = {path: model.get_submodule(path) for path in fallbacks}
    while True:
        try:
            traced = _fx.trace(model, leaves=frozenset(leaves.values()), concrete_args=concrete_args)
            return Analysis(model, traced, fallbacks)
        except TraceFailedError as error:
            if mode == "fx":
                raise TraceFailedError(
                    f"{error}\n  mode=\"fx\" never falls back. Use mode=\"auto\" to capture the names inside "
                    f"{repr(error.module) if error.module else 'the model'} with forward hooks, or make that code traceable "
                    "(docs/fallback.md).",
                    module=error.module,
                    module_type=error.module_type,
                    reason=error.reason,
                ) from error.__cause__
            fallbacks[error.module] = (error.module_type, error.reason)
            if not error.module or error.module in leaves:
                return Analysis(model, None, fallbacks)
            leaves[error.module] = model.get_submodule(error.module)


@dataclass
class Assignment:
    """How each requested name is captured."""

    fx: dict[str, str]  # name -> key, captured by the graph
    hooks: dict[str, _hooks.HookTarget]  # captured by forward hooks
    reasons: dict[str, str]  # name -> why it is not FX ("" for FX names)
    module_types: dict[str, str]
    leaves: dict[str, str]  # hooked name -> the leaf module of the graph that runs it ("" = none)


def assign(analysis: Analysis, request: dict[str, str], *, mode: str, note: str = "") -> Assignment:
    """Give each requested name a path, or raise ``TapNameError`` for names that do not exist."""
    points = analysis.traced.points if analysis.traced is not None else {}
    fx_names = {name: key for name, key in request.items() if name in points}
    rest = [name for name in request if name not in points]
    targets, unknown = _hooks.hook_targets(analysis.model, rest)
    leaves = analysis.hookable_under()
    outside = [name for name, t in targets.items() if not any(_inside(t.path, leaf) for leaf in leaves)]
    if mode == "fx" and targets:
        unknown += list(targets)
    else:
        unknown += outside
    if unknown:
        raise TapNameError(_unknown_message(analysis, unknown, mode, note))
    hooked = {name: t for name, t in targets.items() if name not in unknown}
    reasons = {name: "" for name in fx_names}
    types = {name: points[name].module_type for name in fx_names}
    outer: dict[str, str] = {}
    for name, target in hooked.items():
        leaf = max((leaf for leaf in leaves if _inside(target.path, leaf)), key=len)
        outer[name] = min((leaf for leaf in leaves if _inside(target.path, leaf)), key=len)
        module_type, reason = analysis.fallbacks.get(leaf, (type(analysis.model.get_submodule(leaf)).__name__, ""))
        reasons[name] = reason or f"inside {leaf!r} ({module_type}), a torch.nn module that FX keeps as one step"
        types[name] = type(analysis.model.get_submodule(target.path)).__name__
    return Assignment(fx_names, hooked, reasons, types, outer)


def _unknown_message(analysis: Analysis, unknown: list[str], mode: str, note: str) -> str:
    available = analysis.names()
    message = _names.unknown_name_message(unknown, type(analysis.model).__name__, available, note)
    hints = []
    for name in unknown:
        near = _hooks.nearest_module(analysis.model, name)
        if analysis.traced is None and near:
            hints.append(
                f"  {name!r} is not a module call, and hooks capture module outputs only: "
                f"the nearest module whose output can be hooked is {near!r}."
            )
        elif analysis.traced is not None and (target := _hooks.hook_targets(analysis.model, [name])[0].get(name)):
            if any(_inside(target.path, leaf) for leaf in analysis.hookable_under()):
                hints.append(f"  {name!r} is inside a module FX keeps as one step; mode=\"auto\" captures it with a hook.")
            elif target.call_index == 0:
                hints.append(
                    f"  {name!r} is a module that forward never calls (a ModuleList or ModuleDict is iterated, "
                    "not called), so it has no output of its own: tap its children."
                )
    return "\n".join([message, *hints])
