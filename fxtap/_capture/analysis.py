"""Tracing a model so that only untraceable code is left to hooks.

``analyse`` traces a model, and when a submodule's code cannot be traced, makes that submodule
an opaque leaf and traces again. ``placement`` then gives every requested name its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._errors import TraceFailedError
from . import fx as _fx
from . import names as _names

__all__ = ["Analysis", "analyse"]


@dataclass
class Analysis:
    """What tracing found: the traced graph (``None`` when the root's own code fails) and why
    each opaque submodule is opaque (``""`` is the root)."""

    model: nn.Module
    traced: _fx.Traced | None
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (module type, reason)
    hints: _fx.Hints = field(default_factory=_fx.Hints)  # the user's tracer hints, for every later trace

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
            path
            for path, module in self.model.named_modules()
            if path and path not in known and _names.enclosing(path, leaves, strict=True) is not None and _callable(module)
        ]
        uncalled = _never_called(self.model)
        return fx_names + [path for path in hookable if _names.enclosing(path, uncalled, strict=True) is None]


def _never_called(model: nn.Module) -> set[str]:
    """Paths of ``torch.nn`` modules whose own forward never calls their submodules:
    ``nn.MultiheadAttention`` reads ``out_proj``'s weight and bias (in
    ``F.multi_head_attention_forward`` or its fused kernel) and never calls it."""
    return {
        path for path, module in model.named_modules() if isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward
    }


def _callable(module: nn.Module) -> bool:
    """Whether calling ``module`` can return anything: a container without a forward of its own
    (``ModuleList``, ``ModuleDict``) is iterated, never called, so it has no output to tap."""
    return type(module).forward is not nn.Module.forward


def analyse(
    model: nn.Module,
    *,
    mode: str,
    concrete_args: dict[str, Any] | None,
    fallbacks: dict[str, tuple[str, str]] | None = None,
    hints: _fx.Hints = _fx.NO_HINTS,
    write_code: bool = True,
) -> Analysis:
    """Trace ``model``; in ``mode="auto"`` make each untraceable submodule a leaf and retry.

    Args:
        fallbacks: submodules to keep opaque from the start (path -> (type, reason)), so that a
            new trace of the same model puts the same names on hooks.

        write_code: see ``fx.trace``.

    Raises:
        TraceFailedError: in ``mode="fx"``, naming the untraceable submodule.
    """
    if mode == "hooks":
        return Analysis(model, None, {"": (type(model).__name__, 'mode="hooks" was asked for')}, hints)
    fallbacks = {path: why for path, why in (fallbacks or {}).items() if path}
    leaves: dict[str, nn.Module] = {path: model.get_submodule(path) for path in fallbacks}
    while True:
        try:
            traced = _fx.trace(model, leaves=frozenset(leaves.values()), concrete_args=concrete_args, hints=hints, write_code=write_code)
            return Analysis(model, traced, fallbacks, hints)
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
                return Analysis(model, None, fallbacks, hints)
            leaves[error.module] = model.get_submodule(error.module)
