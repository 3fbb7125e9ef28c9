"""Placing each requested name: captured by the graph, or by a forward hook, and why."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import TapNameError
from . import hooks as _hooks
from . import names as _names
from .analysis import Analysis, _inside

__all__ = ["Assignment", "assign"]


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
    return "\n".join([message, *hints, *_hooks.alias_hints(analysis.model, unknown)])
