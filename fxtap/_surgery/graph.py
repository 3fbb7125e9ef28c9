"""Cutting a traced graph at named values: what lies between the inputs and the outputs.

``split`` turns a model's traced graph into the graph of a cut, in five steps:

1. **Inputs.** A placeholder per cut input (named by its key) takes the place of the input's
   value in every use *after* the value's moment; uses at or before it belong to computing it.
2. **Upstream.** A node is upstream when it depends on the model's inputs and the cut inputs
   are computed from it (its ancestors), or it ran inside the module that returned a cut input
   and reads that value. Upstream nodes never run in the cut.
3. **Walk.** From the outputs backwards (plus guards and state writes that only need values the
   cut computes): a needed upstream node is a model input (an extra argument of the cut), a
   shape read that the cut inputs' shapes answer (``x.shape[0]``), or a missing value: the
   error lists those by tap name.
4. **Alias check.** An in-place write after the cut into storage that a cut input shares with
   something the cut does not run is refused: the cut could not reproduce it.
5. **Prune** with ``prune.plan`` (as ``tap`` does): outputs that a later in-place op overwrites
   are copied at their moment, and a cut input that the graph writes into is copied first, so
   the caller's tensor is never changed.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

from torch import fx

from .._capture import fx as _fx
from .._capture.prune import facts, plan, written_after
from .._errors import CutError
from .._values import copy_value
from .shapes import Evidence

__all__ = ["Split", "split"]


@dataclass
class Split:
    """A cut's graph and its inputs: the cut inputs' keys, then the model inputs it still needs."""

    graph: fx.Graph
    inputs: list[str]
    extra: list[str]  # model inputs among ``inputs``


def split(traced: _fx.Traced, inputs: dict[str, str], outputs: dict[str, str], evidence: Evidence | None) -> Split:
    """The graph computing ``outputs`` (``{tap name or "output": key}``) from ``inputs`` (``{tap name: key}``).

    Raises:
        CutError: a needed value is neither a cut input nor computable from them (``.missing``
            lists their tap names), or a cut input is not one tensor, or an in-place write after
            the cut cannot be reproduced.
    """
    graph, env, old_output = _fx.copy_without_output(traced)
    order = {n: i for i, n in enumerate(graph.nodes)}
    before = facts(graph, traced.root)  # alias classes of the model's own graph
    names = _Names(traced, env, order)
    cut = _replace_inputs(graph, traced, inputs, env, order)
    wanted, end_reads, results = _outputs(traced, outputs, env, cut, old_output, order)
    upstream = _upstream(graph, cut, order)
    early = [name for name in outputs if name != "output" and any(n in upstream for n in _nodes_of(results[outputs[name]][0]))]
    if early:
        raise CutError(
            f"cannot cut {type(traced.root).__name__} at {', '.join(map(repr, inputs))}: the output{'s' if len(early) > 1 else ''} "
            f"{', '.join(map(repr, early))} {'are' if len(early) > 1 else 'is'} computed before the cut.\n"
            "  Add them to the inputs (the cut then returns them as given), or ask for outputs after the cut; see docs/cut.md.",
            missing=early,
        )
    walk = _Walk(graph, traced, cut, upstream, order, evidence, names)
    walk.run([n for n, _ in wanted] + end_reads + [m for _, m in wanted if m not in upstream])
    walk.seed_guards_and_state()
    walk.keep_writes(wanted, end_reads)
    if walk.missing:
        raise CutError(walk.message(inputs, outputs), missing=list(walk.missing))
    for node in reversed(list(graph.nodes)):
        if node not in walk.needed:
            graph.erase_node(node)
    _check_aliases(graph, traced, cut, before, order, walk.needed, names)
    wanted = [(v, _present(m, walk.needed, order, graph)) for v, m in wanted]
    # the cut reads each input through a copy, which later in-place writes change as they change
    # the value in the model (outputs read at the end included); a copy nothing writes into goes
    clones = _clone_inputs(graph, cut)
    wanted = [(clones.get(v, v), clones.get(m, m)) for v, m in wanted]
    end_reads = [clones.get(n, n) for n in end_reads]
    results = {key: (fx.node.map_arg(v, lambda n: clones.get(n, n)), clones.get(m, m)) for key, (v, m) in results.items()}
    decided = plan(graph, traced.root, wanted, end_reads)
    for node in reversed(list(graph.nodes)):
        if node not in decided.kept and node.op != "placeholder":
            graph.erase_node(node)
    back = _drop_unwritten_clones(graph, traced, clones, decided.kept)
    results = {key: (fx.node.map_arg(v, lambda n: back.get(n, n)), back.get(m, m)) for key, (v, m) in results.items()}
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        if not any(node is c.placeholder for c in cut):
            graph.erase_node(node)  # a model input that only pruned code read
    snapshots: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
    for (node, moment), anchor in decided.copies.items():
        with graph.inserting_after(anchor):
            snapshots[(node, moment)] = graph.call_function(copy_value, (node,))
    graph.output({key: fx.node.map_arg(value, functools.partial(_snapshot, snapshots, moment)) for key, (value, moment) in results.items()})
    for node in graph.nodes:
        node.type = None  # string annotations (``from __future__ import annotations``) break TorchScript
    graph.lint()
    extra = [str(n.target) for n in graph.nodes if n.op == "placeholder" and not any(n is c.placeholder for c in cut)]
    clash = sorted(set(extra) & {c.key for c in cut})
    if clash:
        raise CutError(
            f"the cut input key{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash))} also name{'' if len(clash) > 1 else 's'} "
            "a model input that the cut still reads: rename the cut input with a mapping {name: key}."
        )
    return Split(graph, [c.key for c in cut] + extra, extra)


@dataclass
class _Input:
    name: str
    key: str
    value: fx.Node
    moment: fx.Node
    placeholder: fx.Node


def _replace_inputs(graph: fx.Graph, traced: _fx.Traced, inputs: dict[str, str], env: dict[fx.Node, fx.Node], order: dict[fx.Node, int]) -> list[_Input]:
    first = next(iter(graph.nodes))
    cut: list[_Input] = []
    for name, key in inputs.items():
        point = traced.points[name]
        if not isinstance(point.value, fx.Node):
            raise CutError(
                f"cannot cut at {name!r}: its value is a {type(point.value).__name__} of tensors, and a cut input must be one tensor. "
                f"Cut at the tensors inside it (the ops that compute them) instead."
            )
        with graph.inserting_before(first):
            placeholder = graph.placeholder(_identifier(key))
        placeholder.meta["fxtap_key"] = key
        value, moment = env[point.value], env[point.moment]
        for user in list(value.users):
            if user in order and order[user] > order[moment]:
                user.replace_input_with(value, placeholder)
        cut.append(_Input(name, key, value, moment, placeholder))
    return cut


def _identifier(key: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return text if text and not text[0].isdigit() else f"_{text}"


def _outputs(
    traced: _fx.Traced, outputs: dict[str, str], env: dict[fx.Node, fx.Node], cut: list[_Input], old_output: Any, order: dict[fx.Node, int]
) -> tuple[list[tuple[fx.Node, fx.Node]], list[fx.Node], dict[str, tuple[Any, fx.Node]]]:
    """(value, moment) pairs wanted, nodes read at the end, and each output key's value."""
    wanted: list[tuple[fx.Node, fx.Node]] = []
    end_reads: list[fx.Node] = []
    results: dict[str, tuple[Any, fx.Node]] = {}
    for name, key in outputs.items():
        if name == "output":
            value = fx.node.map_arg(old_output, lambda n: _after_cut(n, None, cut, order))
            end_reads += _nodes_of(value)
            results[key] = (value, None)  # type: ignore[assignment]
            continue
        point = traced.points[name]
        moment = env[point.moment]
        value = fx.node.map_arg(point.value, functools.partial(_traced_after_cut, env, moment, cut, order))
        wanted += [(n, moment) for n in _nodes_of(value)]
        results[key] = (value, moment)
    return wanted, end_reads, results


def _after_cut(node: fx.Node, moment: fx.Node | None, cut: list[_Input], order: dict[fx.Node, int]) -> fx.Node:
    """A value read at ``moment`` (``None``: at the end): the cut input it is, if read after that input's moment."""
    for c in cut:
        if node is c.value and (moment is None or order[moment] >= order[c.moment]):
            return c.placeholder
    return node


def _traced_after_cut(env: dict[fx.Node, fx.Node], moment: fx.Node, cut: list[_Input], order: dict[fx.Node, int], node: fx.Node) -> fx.Node:
    return _after_cut(env[node], moment, cut, order)


def _snapshot(snapshots: dict[tuple[fx.Node, fx.Node], fx.Node], moment: fx.Node, node: fx.Node) -> fx.Node:
    return snapshots.get((node, moment), node)


def _upstream(graph: fx.Graph, cut: list[_Input], order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes that depend on the model's inputs and that the cut inputs are computed from."""
    placeholders = {c.placeholder for c in cut}
    data: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node not in placeholders) or any(n in data for n in node.all_input_nodes):
            data.add(node)
    upstream: set[fx.Node] = set()
    stack = [c.value for c in cut]
    while stack:
        node = stack.pop()
        if node in upstream or node not in data:
            continue
        upstream.add(node)
        stack.extend(node.all_input_nodes)
    for c in cut:  # the rest of the module that returned the value, where it reads the value
        inside = {c.value}
        for node in graph.nodes:
            if node in order and order[c.value] < order[node] <= order[c.moment] and any(n in inside for n in node.all_input_nodes):
                inside.add(node)
        upstream |= inside & data
    return upstream


_SHAPE_METHODS = frozenset({"size", "dim"})


def _shape_read(node: fx.Node) -> tuple[fx.Node, str, int | None] | None:
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
            read = _shape_read(source)
            if read is not None and read[1] == "shape":
                return read[0], "size", node.args[1]
    return None


class _Names:
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


class _Walk:
    """Which nodes the cut runs, which model inputs it takes, which values it misses."""

    def __init__(self, graph: fx.Graph, traced: _fx.Traced, cut: list[_Input], upstream: set[fx.Node], order: dict[fx.Node, int], evidence: Evidence | None, names: _Names) -> None:
        self.graph, self.traced, self.cut, self.upstream = graph, traced, cut, upstream
        self.order, self.evidence, self.names = order, evidence, names
        self.needed: set[fx.Node] = {c.placeholder for c in cut}
        self._first_use: dict[fx.Node, tuple[int, str]] = {}  # missing node -> (its first needed use, "value" | "shape")

    def run(self, seeds: list[fx.Node]) -> None:
        pending = set(seeds)
        for node in reversed(list(self.graph.nodes)):
            if node not in pending or node in self.needed:
                continue
            read = _shape_read(node)
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
                if source in self.upstream and source.op != "placeholder" and _shape_read(source) is None:
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
        ops = facts(self.graph, self.traced.root)
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
        ops = facts(self.graph, self.traced.root)
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
        model = type(self.traced.root).__name__
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


def _check_aliases(graph: fx.Graph, traced: _fx.Traced, cut: list[_Input], before: Any, order: dict[fx.Node, int], needed: set[fx.Node], names: _Names) -> None:
    """Refuse a cut input whose storage an in-place op the cut cannot reproduce writes to, before the cut reads it."""
    after = facts(graph, traced.root)
    for c in cut:
        mine = after.find(c.placeholder)
        reads = [n for n in graph.nodes if n.op != "placeholder" and any(after.find(s) is mine for s in n.all_input_nodes)]
        for writer, written in before.writes.items():
            if order[writer] <= order[c.moment] or not any(before.find(w) is before.find(c.value) for w in written):
                continue
            reproduced = writer in needed and any(after.find(w) is mine for w in after.writes.get(writer, []))
            if not reproduced and any(order.get(r, -1) > order[writer] for r in reads):
                raise CutError(
                    f"cannot cut {type(traced.root).__name__} at {c.name!r}: {names.of(writer)!r} writes into it in place after the cut, "
                    "through memory the cut does not compute. Cut after that op instead (see docs/cut.md)."
                )


def _present(moment: fx.Node, needed: set[fx.Node], order: dict[fx.Node, int], graph: fx.Graph) -> fx.Node:
    """``moment`` if the cut runs it, else the last node the cut runs before it."""
    if moment is None or moment in needed:
        return moment
    earlier = [n for n in graph.nodes if n in order and order[n] <= order[moment]]
    return earlier[-1] if earlier else next(iter(graph.nodes))


def _clone_inputs(graph: fx.Graph, cut: list[_Input]) -> dict[fx.Node, fx.Node]:
    """Make every use of each cut input read a copy of it (placeholder -> copy): the caller's
    tensor is never written into, and the copy changes as the model's value does."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    clones: dict[fx.Node, fx.Node] = {}
    for c in cut:
        with graph.inserting_after(last):
            clone = graph.call_method("clone", (c.placeholder,))
        c.placeholder.replace_all_uses_with(clone, delete_user_cb=lambda u, clone=clone: u is not clone)
        clones[c.placeholder] = clone
    return clones


def _drop_unwritten_clones(graph: fx.Graph, traced: _fx.Traced, clones: dict[fx.Node, fx.Node], kept: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Read the cut input itself where no kept node writes into its copy (copy -> placeholder)."""
    back: dict[fx.Node, fx.Node] = {}
    for placeholder, clone in clones.items():
        if clone.graph is graph and clone in kept and not written_after(graph, traced.root, clone, kept):
            clone.replace_all_uses_with(placeholder)
            graph.erase_node(clone)
            back[clone] = placeholder
    return back


def _nodes_of(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found
