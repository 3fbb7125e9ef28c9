"""Edits inside a cut (``fxtap.cut(..., edit=...)``): step 0 of ``graph.split``.

The edits go into the model's whole graph first, exactly as ``tap(..., edit=)`` puts them
(``_capture.edit.insert``: each edit node right after its value's moment, every later use
reading its result). The cut then happens on that graph, and the three cases follow from it:

- an edit of a value the cut computes runs in the cut graph;
- an edit of a cut input reads the cut's placeholder (it is the only use of the value after
  its moment), so it applies to the value the caller gives;
- an edit of a value computed before the cut (upstream of a cut input) would never run:
  ``check_after_cut`` refuses it, naming the way out (tap the inputs with the edit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.fx.node import Argument

from .._capture import edit as _edit
from .._capture import fx as _fx
from .._capture.prune import written_after
from .._errors import CutError

__all__ = ["Applied"]


@dataclass
class Applied:
    """The edits put into a cut's working graph: its new root, the model's output after them,
    and how to read a tap point after them."""

    root: nn.Module  # the model, or its twin holding the edit modules
    output: Argument  # what the model returns, after the edits
    _traced: _fx.Traced
    _env: dict[fx.Node, fx.Node]
    _position: dict[fx.Node, int] = field(default_factory=dict)  # graph order before the edits went in
    _inserted: _edit.Inserted | None = None
    _nodes: dict[str, fx.Node] = field(default_factory=dict)  # edited name -> its edit's call node

    @classmethod
    def into(cls, graph: fx.Graph, traced: _fx.Traced, env: dict[fx.Node, fx.Node], edits: dict[str, nn.Module], output: Argument) -> Applied:
        """Insert ``edits`` (tap name -> module) into ``graph``, the copy of ``traced.graph`` by ``env``."""
        if not edits:
            return cls(traced.root, output, traced, env)
        position = {node: i for i, node in enumerate(graph.nodes)}
        points = {name: _copied(traced.points[name], env) for name in edits}
        inserted = _edit.insert(graph, traced.root, points, edits)
        nodes = {str(n.meta["fxtap_edit"]): n for n in graph.nodes if "fxtap_edit" in n.meta}
        return cls(inserted.root, inserted.end(output), traced, env, position, inserted, nodes)

    def point(self, name: str) -> tuple[Argument, fx.Node]:
        """``(value, moment)`` of tap ``name`` in the working graph: a tap of an edited name, or
        downstream of an edit, reads the edited value (as ``tap`` does)."""
        point = _copied(self._traced.points[name], self._env)
        if self._inserted is None:
            return point.value, point.moment
        key = _edit.order_key(self._position, point.moment, point.kind, point.name)
        value = self._inserted.remap(point.value, key)
        if value is point.value:
            return value, point.moment
        order = {node: i for i, node in enumerate(point.moment.graph.nodes)}
        return value, max([point.moment, *_nodes_of(value)], key=order.__getitem__)  # after the edit's last node

    def check_after_cut(self, upstream: set[fx.Node], inputs: dict[str, str]) -> None:
        """Refuse edits of values computed before the cut: the cut never runs them."""
        early = [name for name, node in self._nodes.items() if node in upstream]
        if not early:
            return
        listed = ", ".join(map(repr, early))
        raise CutError(
            f"cannot edit {listed} in a cut of {type(self._traced.root).__name__} at {', '.join(map(repr, inputs))}: "
            f"{'it is' if len(early) == 1 else 'they are'} computed before the cut, which the cut never runs.\n"
            f"  Edit while taking the cut inputs instead: fxtap.tap(model, {list(inputs)!r}, edit={{{listed}: ...}}) "
            "returns them as computed after the edit; see docs/cut.md."
        )

    def protect(self, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
        """A tensor edit returns the user's tensor: copy it where a later in-place op of the cut
        would write into it (as ``tap`` does). Returns each copied node -> its copy."""
        if self._inserted is None:
            return {}
        kept = set(graph.nodes)
        patches = [n for n in self._inserted.patches if n in kept]
        return _edit.protect(graph, patches, lambda node: written_after(graph, self.root, node, kept))


def _copied(point: _fx.TapPoint, env: dict[fx.Node, fx.Node]) -> _fx.TapPoint:
    return point._replace(value=fx.node.map_arg(point.value, env.__getitem__), moment=env[point.moment])


def _nodes_of(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found
