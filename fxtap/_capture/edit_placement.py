"""Placing each edit: in the graph, or on a forward hook (module outputs in untraceable code), or
refused (a functional op that only untraceable code computes), with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .._errors import TapNameError
from . import hooks as _hooks
from . import names as _names
from .analysis import Analysis

if TYPE_CHECKING:
    from .regions import Resolution

__all__ = ["EditPlacement", "from_regions", "place", "refusal"]


@dataclass
class EditPlacement:
    """How each edit is applied."""

    fx: dict[str, nn.Module] = field(default_factory=dict)  # name -> edit module, inserted in the graph
    hooks: dict[str, tuple[_hooks.HookTarget, nn.Module]] = field(default_factory=dict)  # applied by a forward hook
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why it is not in a graph ("" for graph edits)
    module_types: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return "hook" if name in self.hooks else "fx"


def place(analysis: Analysis, edits: dict[str, nn.Module], *, mode: str) -> EditPlacement:
    """Give each edit a path, or raise ``TapNameError`` for names that cannot be edited."""
    points = analysis.traced.points if analysis.traced is not None and mode != "hooks" else {}
    placed = EditPlacement()
    for name in edits:
        if name in points:
            placed.fx[name] = edits[name]
            placed.reasons[name] = ""
            placed.module_types[name] = points[name].module_type
    rest = [name for name in edits if name not in points]
    targets, unknown = _hooks.hook_targets(analysis.model, rest)
    leaves = analysis.hookable_under()
    for name, target in targets.items():
        leaf = _names.enclosing(target.path, leaves, strict=True)
        if leaf is None or mode == "fx":
            unknown.append(name)
            continue
        module_type, reason = analysis.fallbacks.get(leaf, (type(analysis.model.get_submodule(leaf)).__name__, ""))
        placed.hooks[name] = (target, edits[name])
        placed.reasons[name] = reason or f"inside {leaf!r} ({module_type}), a torch.nn module that FX keeps as one step"
        placed.module_types[name] = type(analysis.model.get_submodule(target.path)).__name__
    if unknown:
        raise TapNameError(_message(analysis, unknown, mode))
    return placed


def _message(analysis: Analysis, unknown: list[str], mode: str) -> str:
    lines = []
    for name in unknown:
        near = _hooks.nearest_module(analysis.model, name)
        reason = _eager_reason(analysis, near)
        if reason is not None:
            lines.append(refusal(name, near, reason, _called_by(analysis.model, near)))
    if lines and len(lines) == len(unknown):
        return "\n".join(lines)
    note = ' (mode="hooks")' if mode == "hooks" else ' (mode="fx")' if mode == "fx" else ""
    message = _names.unknown_name_message(unknown, type(analysis.model).__name__, analysis.names(), note)
    return "\n".join([f"cannot edit: {message}", *lines])


def refusal(name: str, near: str, reason: str, called: list[str] | None = None) -> str:
    """Why a name inside untraceable code cannot be edited, and what can: the enclosing module
    ``near``, or (for the root's own code, ``near == ""``) the modules that code calls."""
    if near:
        where = f"the nearest module whose output can be edited is {near!r}"
    elif called:
        shown = ", ".join(map(repr, called[:8])) + (", ..." if len(called) > 8 else "")
        where = f"edit the output of a module the model's own forward calls (the nearest ones whose output can be edited: {shown})"
    else:
        where = "edit a module output"
    return (
        f"cannot edit {name!r}: it is not a module output, and the code that computes it runs eagerly ({reason}); "
        f"a forward hook can replace module outputs only.\n  Instead, {where}, or make that code traceable (docs/fallback.md)."
    )


def _called_by(root: nn.Module, near: str) -> list[str]:
    """The modules the root's own code can call (its children; a ModuleList's or ModuleDict's
    items in their place), in registration order; empty when ``near`` is not the root."""
    if near:
        return []
    found: list[str] = []
    for name, child in root.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found += [f"{name}.{item}" for item, _ in child.named_children()]
        else:
            found.append(name)
    return found


def _eager_reason(analysis: Analysis, path: str) -> str | None:
    """Why the code of module ``path`` runs eagerly, or ``None`` when a graph holds it."""
    if analysis.traced is None:
        return analysis.fallbacks.get("", ("", "it is not traced"))[1]
    leaf = _names.enclosing(path, analysis.fallbacks)
    return None if leaf is None else analysis.fallbacks[leaf][1]


def from_regions(found: Resolution, edits: dict[str, nn.Module], request: dict[str, str]) -> EditPlacement:
    """Move the edited names of ``found`` from what is captured to what is edited; raise for an
    edit no graph and no hook can apply. Names both requested and edited stay captured too."""
    placed = EditPlacement()
    refused = [name for name in found.unknown if name in edits]
    if refused and found.root is not None:
        lines = []
        for name in refused:
            near = _hooks.nearest_module(found.root, name)
            owner = _names.enclosing(near, found.fallbacks) or ""
            lines.append(refusal(name, near, found.fallbacks[owner][1], _called_by(found.root, near)))
        raise TapNameError("\n".join(lines))
    for name, target in list(found.hooks.items()):
        if name in edits:
            owner = _names.enclosing(target.path, found.fallbacks) or ""
            placed.hooks[name] = (target, edits[name])
            placed.reasons[name] = found.fallbacks[owner][1]
            placed.module_types[name] = type(found.root.get_submodule(target.path)).__name__ if found.root is not None else ""
            if name not in request:
                del found.hooks[name]
    for region in found.regions:
        for name in [n for n in region.wanted if n in edits]:
            region.edits[name] = edits[name]
            placed.fx[name] = edits[name]
            placed.reasons[name] = ""
            placed.module_types[name] = found.fx.get(name, "")
            if name not in request:
                del region.wanted[name]
                region.hookable.pop(name, None)
                found.fx.pop(name, None)
    return placed
