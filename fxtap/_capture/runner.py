"""Running a placement: a graph, hooks, or both (hooks inside the graph's leaves, or graphs of
traceable submodules inside an eagerly running model)."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .._errors import MissingCallError
from .._values import detach_value
from . import hooks as _hooks
from . import placement as _plan
from . import regions as _regions
from .call_spec import graph_args as _graph_args
from .edit_placement import EditPlacement

__all__ = ["Runner"]


class Runner:
    """One way to compute the requested values: a graph, hooks, or both (hooks inside the graph's
    leaves, or graphs of traceable submodules inside an eagerly running model)."""

    def __init__(
        self,
        graph: fx.GraphModule | None,
        assignment: _plan.Assignment,
        request: dict[str, str],
        *,
        keep_output: bool,
        detach: bool,
        regions: list[_regions.Region] | None = None,
        edits: EditPlacement | None = None,
    ) -> None:
        self.graph = graph
        self.edits = edits or EditPlacement()
        self.assignment = assignment
        self.regions = regions or []
        self._request = request
        self._keep_output = keep_output
        self._detach = detach

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        targets = self.assignment.hooks
        if self.graph is not None and not targets and not self.edits.hooks:
            return dict(self.graph(*_graph_args(model, args, kwargs)))  # the graph returns keys in order
        stop_early = self.graph is None and not self._keep_output
        in_regions = 0 if self.graph is not None else len(self.assignment.fx)
        from_graph: dict[str, Any] = {}
        with _hooks.capture(model, targets, stop_when_done=stop_early, extra=in_regions, edits=self.edits.hooks) as captured:
            with _regions.serve(self.regions, captured, detach=self._detach):
                if self.graph is not None:
                    from_graph = self.graph(*_graph_args(model, args, kwargs))
                else:
                    from_graph = {"output": model(*args, **kwargs)}
        in_regions_edits = list(self.edits.fx) if self.graph is None else []
        unapplied = _hooks.unapplied_edits_message(self.edits.hooks, captured, type(model).__name__, in_regions_edits)
        if unapplied:
            raise MissingCallError(unapplied)
        expected = set(targets) if self.graph is not None else set(targets) | set(self.assignment.fx)
        if not expected <= set(captured.values):
            raise MissingCallError(self._missing_message(model, captured))
        hooked = {name: detach_value(captured.values[name]) if self._detach else captured.values[name] for name in targets}
        out = {
            key: hooked[name] if name in targets else (from_graph[key] if self.graph is not None else captured.values[name])
            for name, key in self._request.items()
        }
        if self._keep_output:
            out["output"] = from_graph["output"]
        return out

    def _missing_message(self, model: nn.Module, captured: Any) -> str:
        more = [
            f"{name!r} (from {region.path!r}, which ran {captured.served.get(region.path, 0)} time(s))"
            for region in self.regions
            for name in region.wanted
            if name not in captured.values
        ]
        message = _hooks.missing_calls_message(
            {n: t for n, t in self.assignment.hooks.items() if n not in captured.values}, captured, type(model).__name__, more
        )
        failed = [r.failed for r in self.regions if r.failed and any(g not in captured.values for g in r.wanted)]
        return message + "".join(f"\n  {reason}" for reason in failed)
