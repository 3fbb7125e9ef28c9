"""Running a placement: one runner class per strategy.

- ``GraphRunner``: one graph computes every name (the common case: no Python-side dispatch).
- ``HookedGraphRunner``: the graph runs, and forward hooks inside its leaves take the names it
  cannot hold (modules inside an opaque or ``torch.nn`` leaf).
- ``EagerRunner``: the model's own forward runs eagerly (or ``mode="hooks"``); children traced on
  their own serve their names from their graphs (``regions``), hooks take the rest, and the
  forward stops as soon as every name is captured unless the model's output is wanted or some
  module may change state.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .._errors import MissingCallError, TapNameError
from .._values import detach_value
from . import eager_ops as _eager_ops
from . import hooks as _hooks
from . import names as _names
from . import regions as _regions
from .call_spec import graph_args, graph_kwargs
from .placement import Placement
from .prune import may_change_state

__all__ = ["EagerRunner", "GraphRunner", "HookedGraphRunner", "Runner", "make_runner"]


class Runner:
    """Computes the values of one ``Placement`` for one call of ``model``.

    Attributes:
        graph: the graph that runs (``None`` when the model's own forward runs eagerly).
        placement: where each name is captured.
    """

    graph: fx.GraphModule | None = None
    recorder: _hooks.Recorder | None = None  # names every name a call produces (``produced.py``), when set

    def __init__(self, placement: Placement, *, keep_output: bool, detach: bool) -> None:
        self.placement = placement
        self._keep_output = keep_output
        self._detach = detach

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # what the last call did (an ``export.ExportRunner`` may run one exported graph instead)
    @property
    def mode(self) -> str:
        return self.placement.mode

    def path(self, name: str) -> str:
        return self.placement.path(name)

    def reason(self, name: str) -> str:
        return self.placement.reasons.get(name, "")

    def _hooked(self, values: dict[str, Any]) -> dict[str, Any]:
        hooks = self.placement.hooks
        return {name: detach_value(values[name]) if self._detach else values[name] for name in hooks}

    def _unapplied(
        self, model: nn.Module, captured: _hooks.CallLog, in_graphs: list[str], edits: dict[str, tuple[_hooks.HookTarget, Any]] | None = None
    ) -> None:  # fmt: skip
        """An edit that found no call to edit is an error, as a tap that found none is."""
        edits = self.placement.edits.hooks if edits is None else edits
        message = _hooks.unapplied_edits_message(edits, captured, type(model).__name__, in_graphs)
        if message:
            raise MissingCallError(message)

    def _missing_ops(self, model: nn.Module, produced: _eager_ops.Produced, captured: _hooks.CallLog) -> None:
        """An op name of eager code that this call did not produce does not exist (for this call)."""
        message = _eager_ops.missing_message(self.placement.eager_ops, produced, captured.values, type(model).__name__)
        if message:
            raise TapNameError(message)

    def _missing(self, model: nn.Module, captured: _hooks.CallLog, expected: set[str]) -> None:
        if expected <= set(captured.values):
            return
        placement = self.placement
        more = [
            f"{name!r} (from {region.path!r}, which ran {captured.served.get(region.path, 0)} time(s))"
            for region in placement.regions
            for name in region.wanted
            if name not in captured.values
        ]
        message = _hooks.missing_calls_message(
            {n: t for n, t in placement.hooks.items() if n not in captured.values}, captured, type(model).__name__, more
        )
        failed = [r.failed for r in placement.regions if r.failed and any(g not in captured.values for g in r.wanted)]
        raise MissingCallError(message + "".join(f"\n  {reason}" for reason in failed))


class GraphRunner(Runner):
    """One graph computes every requested value (and the output, when kept)."""

    def __init__(self, graph: fx.GraphModule, placement: Placement, *, keep_output: bool, detach: bool) -> None:
        super().__init__(placement, keep_output=keep_output, detach=detach)
        self.graph = self._graph = graph

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return dict(self._graph(*graph_args(model, args, kwargs), **graph_kwargs(model, kwargs)))  # the graph returns the keys in order


class HookedGraphRunner(GraphRunner):
    """The graph runs; hooks inside its leaves capture the names it cannot hold."""

    def __init__(self, graph: fx.GraphModule, placement: Placement, *, keep_output: bool, detach: bool) -> None:
        super().__init__(graph, placement, keep_output=keep_output, detach=detach)
        # an edit inside a leaf that the pruned graph does not call (nothing requested needs it)
        # has nothing to change, as an edit after an eager forward stopped early
        leaves = [str(node.target) for node in graph.graph.nodes if node.op == "call_module"]
        self._edits_run = {n: e for n, e in placement.edits.hooks.items() if _names.enclosing(e[0].path, leaves) is not None}

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        hooks = self.placement.hooks
        ops = self.placement.eager_ops
        with (
            _hooks.capture(model, hooks, edits=self.placement.edits.hooks, record=self.recorder) as captured,
            _eager_ops.naming(model, ops, captured.add, detach=self._detach) as produced,
        ):
            from_graph = self._graph(*graph_args(model, args, kwargs), **graph_kwargs(model, kwargs))
        self._unapplied(model, captured, [], self._edits_run)
        self._missing(model, captured, set(hooks))
        self._missing_ops(model, produced, captured)
        hooked = self._hooked(captured.values)
        taken = {**captured.values, **hooked}
        out = {key: taken[name] if name in hooks or name in ops.wanted else from_graph[key] for name, key in self.placement.request.items()}
        if self._keep_output:
            out["output"] = from_graph["output"]
        return out


class EagerRunner(Runner):
    """The model's own forward runs; regions and hooks capture the names during it."""

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._run(model, args, kwargs, stop_early=True)

    def _run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, stop_early: bool) -> dict[str, Any]:
        placement = self.placement
        hooks = placement.hooks
        # Cutting the forward short skips what its rest would do to state (buffers, the RNG):
        # only when nothing in the model may change state (prune.may_change_state).
        stop_early = stop_early and not self._keep_output and not may_change_state(model)
        ops = placement.eager_ops
        extra = len(placement.fx) + len(ops.wanted)
        with (
            _hooks.capture(model, hooks, stop_when_done=stop_early, extra=extra, edits=placement.edits.hooks, record=self.recorder) as captured,
            _regions.serve(placement.regions, captured, detach=self._detach),
            _eager_ops.naming(model, ops, captured.add, detach=self._detach) as produced,
        ):
            output = model(*args, **kwargs)
        self._unapplied(model, captured, list(placement.edits.fx))
        self._missing_ops(model, produced, captured)
        self._missing(model, captured, set(hooks) | set(placement.fx))
        hooked = self._hooked(captured.values)
        out = {key: hooked[name] if name in hooks else captured.values[name] for name, key in placement.request.items()}
        if self._keep_output:
            out["output"] = output
        return out


def make_runner(placement: Placement, graph: fx.GraphModule | None, *, keep_output: bool, detach: bool) -> Runner:
    """The runner for a placement: graph only, graph with hooks, or the eager forward."""
    if graph is None:
        return EagerRunner(placement, keep_output=keep_output, detach=detach)
    if placement.hooks or placement.edits.hooks or placement.eager_ops.wanted:
        return HookedGraphRunner(graph, placement, keep_output=keep_output, detach=detach)
    return GraphRunner(graph, placement, keep_output=keep_output, detach=detach)
