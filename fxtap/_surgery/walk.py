"""Which nodes a cut runs: the backward walk from its outputs (step 3 of ``graph.split``).

From the outputs backwards (plus guards and state writes that only need values the cut
computes), a needed node upstream of the cut is a model input (an extra argument of the cut), a
shape read that the cut inputs' shapes answer (``x.shape[0]``, with ``shapes.Evidence``), or a
missing value, which ``Walk.missing`` names by tap name for the error.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx, nn

from .._capture import fx as _fx
from .._capture.prune import facts
from .shapes import Evidence

__all__ = ["Names", "Walk", "shape_read"]


_SHAPE_METHODS = frozenset({"size", "dim"})


def shape_read(node: fx.Node) -> tuple[fx.Node, str, int | None] | None:
    """``(tensor, what, dim)`` when ``node`` reads a tensor's shape: what is "shape", "dim" or "ndim"."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        if node.args[1] == "shape":
            return node.args[0], "shape", None
        if node.args[1] == "ndim":
            return node.args[0], "dim", None
    if node.op == "call_method" and node.target in _SHAPE_METHODS and node.args and isinstance(node.args[0], fx.Node):
        if node.target == "dim" and len(node.args) == 1 and not node.kwargs:
            return node.args[0], "dim", None
        dims = list(node.args[1:]) + list(node.kwargs.values())
        if not dims:
            return node.args[0], "shape", None
        if len(dims) == 1 and isinstance(dims[0], int):
            return node.args[0], "size", dims[0]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        source = node.args[0]
        if isinstance(source, fx.Node):
            read = shape_read(source)
            if read is not None and read[1] == "shape":
                return read[0], "size", node.args[1]
    return None


class Names:
    """The tap name of a graph node, for error messages: the latest name whose moment precedes a use."""

    def __init__(self, traced: _fx.Traced, env: dict[fx.Node, fx.Node], order: dict[fx.Node, int]) -> None:
        self._order = order
        self._by_node: dict[fx.Node, list[tuple[int, tuple[int, int, int], str]]] = {}
        for name, point in traced.points.items():
            if isinstance(point.value, fx.Node):
                rank = (0 if point.kind == "module" else 1, name.count("."), len(name))  # outer modules first
                self._by_node.setdefault(env[point.value], []).append((order[env[point.moment]], rank, name))

    def of(self, node: fx.Node, before: int | None = None) -> str:
        found = [(-m, r, n) for m, r, n in self._by_node.get(node, []) if before is None or m < before]
        return min(found)[2] if found else node.name


class Walk:
    """Which nodes the cut runs, which model inputs it takes, which values it misses."""

    def __init__(self, graph: fx.Graph, root: nn.Module, cut: list[Any], upstream: set[fx.Node], order: dict[fx.Node, int], evidence: Evidence | None, names: Names) -> None:
        self.graph, self.root, self.cut, self.upstream = graph, root, cut, upstream  # root: the model, or its twin holding edits
        self.order, self.evidence, self.names = order, evidence, names
        self.needed: set[fx.Node] = {c.placeholder for c in cut}
        self._first_use: dict[fx.Node, tuple[int, str]] = {}  # missing node -> (its first needed use, "value" | "shape")

    def run(self, seeds: list[fx.Node]) -> None:
        pending = set(seeds)
        for node in reversed(list(self.graph.nodes)):
            if node not in pending or node in self.needed:
                continue
            read = shape_read(node)
            if read is not None and read[0] in self.upstream:
                new = self._from_cut_inputs(node, read)
                if new is not None:
                    node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in self.upstream)
                    self.needed.add(new)
                    continue
                if read[0].op != "placeholder":
                    self._miss(read[0], node, "shape")
                    continue
            self.needed.add(node)
            for source in node.all_input_nodes:
                if source in self.upstream and source.op != "placeholder" and shape_read(source) is None:
                    self._miss(source, node, "value")
                else:
                    pending.add(source)  # a shape read before the cut is answered above, or its tensor is missing

    def _miss(self, source: fx.Node, user: fx.Node, kind: str) -> None:
        first, was = self._first_use.get(source, (len(self.order), "shape"))
        self._first_use[source] = (min(first, self.order.get(user, len(self.order))), "value" if "value" in (was, kind) else "shape")

    @property
    def missing(self) -> dict[str, str]:
        """Tap name -> "value", or "shape" when only its shape is read."""
        return {self.names.of(node, first): kind for node, (first, kind) in sorted(self._first_use.items(), key=lambda item: self.order[item[0]])}

    def _from_cut_inputs(self, user: fx.Node, read: tuple[fx.Node, str, int | None]) -> fx.Node | None:
        """A node computing the same shape from a cut input, when the example run proves them equal."""
        if self.evidence is None:
            return None
        source, what, dim = read
        for c in self.cut:
            if self.evidence.same(source, c.value, what, dim):
                with self.graph.inserting_before(user):
                    if what == "size":
                        return self.graph.call_method("size", (c.placeholder, dim))
                    return self.graph.call_method("dim" if what == "dim" else "size", (c.placeholder,))
        return None

    def seed_guards_and_state(self) -> None:
        """Guards and in-place writes to parameters or buffers that read only what the cut computes."""
        ops = facts(self.graph, self.root)
        attributes = {ops.find(n) for n in self.graph.nodes if n.op == "get_attr"}
        derived, computable = self._derived()
        extra = []
        for node in self.graph.nodes:
            if node in self.needed or node not in derived or node not in computable:
                continue
            if ops.is_guard(node) or any(ops.find(w) in attributes for w in ops.writes.get(node, [])):
                extra.append(node)
        if extra:
            self.run(extra)

    def keep_writes(self, wanted: list[tuple[fx.Node, fx.Node]], end_reads: list[fx.Node]) -> None:
        """Run every in-place op after the cut whose write a needed node (or an output) reads later."""
        ops = facts(self.graph, self.root)
        end = len(self.order) + 1
        while True:
            last_read: dict[fx.Node, int] = {}
            reads = [(s, self.order.get(n, -1)) for n in self.needed for s in n.all_input_nodes]
            reads += [(v, self.order[m]) for v, m in wanted] + [(n, end) for n in end_reads]
            for source, at in reads:
                cls = ops.find(source)
                last_read[cls] = max(last_read.get(cls, -1), at)
            extra = [
                writer
                for writer, written in ops.writes.items()
                if writer not in self.needed and writer not in self.upstream and writer in self.order
                and any(last_read.get(ops.find(w), -1) > self.order[writer] for w in written)
            ]
            if not extra:
                return
            self.run(extra)

    def _derived(self) -> tuple[set[fx.Node], set[fx.Node]]:
        """Nodes that depend on a cut input, and nodes computed from cut inputs and attributes alone."""
        derived = {c.placeholder for c in self.cut}
        computable = set(derived)
        for node in self.graph.nodes:
            if any(n in derived for n in node.all_input_nodes):
                derived.add(node)
            if node.op != "placeholder" and node not in self.upstream and all(n in computable for n in node.all_input_nodes):
                computable.add(node)
        return derived, computable

    def message(self, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        model = type(self.root).__name__
        listed = ", ".join(map(repr, self.missing))
        lines = [
            (
                f"cannot cut {model} at {', '.join(map(repr, inputs))}: the outputs {', '.join(map(repr, outputs))} also need "
                f"{listed}, which {'is' if len(self.missing) == 1 else 'are'} computed before the cut and not from its inputs."
            )
        ]
        shapes = [name for name, kind in self.missing.items() if kind == "shape"]
        if shapes:
            lines.append(
                f"  Only the shape of {', '.join(map(repr, shapes))} is needed: pass example= (the model's inputs) so that "
                "cut can check which dimensions of the cut inputs equal it."
            )
        lines.append(f"  Add {'it' if len(self.missing) == 1 else 'them'} to the inputs: fxtap.cut(model, {[*inputs, *self.missing]!r}, ...); see docs/cut.md.")
        return "\n".join(lines)
