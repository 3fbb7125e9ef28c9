"""Cutting a traced graph at named values: what lies between the inputs and the outputs.

``split`` turns a model's traced graph into the graph of a cut, in five steps, after the
edits (if any) went into the model's whole graph as ``tap`` puts them (``edits.py``):

1. **Inputs.** A placeholder per cut input (named by its key) takes the place of the input's
   value in every use *after* the value's moment; uses at or before it belong to computing it.
2. **Upstream.** A node is upstream when it depends on the model's inputs and the cut inputs
   are computed from it (its ancestors), or it ran inside the module that returned a cut input
   and reads that value. Upstream nodes never run in the cut.
3. **Walk** (``walk.py``). From the outputs backwards (plus guards and state writes that only
   need values the cut computes): a needed upstream node is a model input (an extra argument of
   the cut), a shape read that the cut inputs' shapes answer (``x.shape[0]``), or a missing
   value: the error lists those by tap name.
4. **Alias check.** An in-place write after the cut into storage that a cut input shares with
   something the cut does not run is refused: the cut could not reproduce it.
5. **Prune** with ``prune.plan`` (as ``tap`` does): a cut input that the graph may write into is
   copied first (the caller's tensor is never changed, and outputs read the copy), and outputs
   that a later in-place op overwrites are copied at their moment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .._capture import fx as _fx
from .._capture.codegen import for_torchscript
from .._capture.prune import facts, plan, written_after
from .._errors import CutError
from .._values import copy_value
from . import edits as _edits
from .shapes import Evidence
from .walk import Names, Walk

__all__ = ["Split", "split"]


@dataclass
class Split:
    """A cut's graph and its inputs: the cut inputs' keys, then the model inputs it still needs."""

    graph: fx.Graph
    inputs: list[str]
    extra: list[str]  # model inputs among ``inputs``
    root: nn.Module  # the graph's root: the model, or a twin of it holding the edit modules


def split(
    traced: _fx.Traced,
    inputs: dict[str, str],
    outputs: dict[str, str],
    evidence: Evidence | None,
    edits: dict[str, nn.Module] | None = None,
) -> Split:
    """The graph computing ``outputs`` (``{tap name or "output": key}``) from ``inputs`` (``{tap name: key}``),
    with ``edits`` (tap name -> module) applied where the cut computes the value (``edits.py``).

    Raises:
        CutError: a needed value is neither a cut input nor computable from them (``.missing``
            lists their tap names), or a cut input is not one tensor, or an in-place write after
            the cut cannot be reproduced, or an edit is of a value computed before the cut.
    """
    graph, env, old_output = _fx.copy_without_output(traced)
    edited = _edits.Applied.into(graph, traced, env, edits or {}, old_output)
    root, old_output = edited.root, edited.output
    order = {n: i for i, n in enumerate(graph.nodes)}
    before = facts(graph, root)  # alias classes of the model's own graph
    names = Names(traced, env, order)
    cut = _replace_inputs(graph, traced, inputs, env, order)
    wanted, end_reads, results = _outputs(traced, outputs, env, cut, old_output, order, edited)
    upstream = _upstream(graph, cut, order)
    edited.check_after_cut(upstream, inputs)
    early = [name for name in outputs if name != "output" and any(n in upstream for n in _nodes_of(results[outputs[name]][0]))]
    if early:
        raise CutError(
            f"cannot cut {type(traced.root).__name__} at {', '.join(map(repr, inputs))}: the output{'s' if len(early) > 1 else ''} "
            f"{', '.join(map(repr, early))} {'are' if len(early) > 1 else 'is'} computed before the cut.\n"
            "  Add them to the inputs (the cut then returns them as given), or ask for outputs after the cut; see docs/cut.md.",
            missing=early,
        )
    walk = Walk(graph, root, cut, upstream, order, evidence, names)
    walk.run([n for n, _ in wanted] + end_reads + [m for _, m in wanted if m not in upstream])
    walk.seed_guards_and_state()
    walk.keep_writes(wanted, end_reads)
    if walk.missing:
        raise CutError(walk.message(inputs, outputs), missing=list(walk.missing))
    for node in reversed(list(graph.nodes)):
        if node not in walk.needed:
            graph.erase_node(node)
    _check_aliases(graph, traced, root, cut, before, order, walk.needed, names)
    copies = {**edited.protect(graph), **_copy_written_inputs(graph, root, cut)}
    ran = walk.needed | set(copies.values())
    at = {m: _copied_moment(copies, _present(copies.get(m, m), ran, order, graph)) for m in [m for _, m in wanted] + [m for _, m in results.values()]}
    wanted = [(copies.get(v, v), at[m]) for v, m in wanted]
    end_reads = [copies.get(n, n) for n in end_reads]
    results = {key: (fx.node.map_arg(value, lambda n: copies.get(n, n)), at[m]) for key, (value, m) in results.items()}
    decided = plan(graph, root, wanted + [(c.placeholder, c.placeholder) for c in cut], end_reads)
    for node in reversed(list(graph.nodes)):
        if node not in decided.kept and node.op != "placeholder":
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        if not any(node is c.placeholder for c in cut):
            graph.erase_node(node)  # a model input that only pruned code read
    snapshots: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
    position = {n: i for i, n in enumerate(graph.nodes)}
    for (node, moment), anchor in decided.copies.items():
        if node.op == "placeholder" and any(node is c.placeholder for c in cut):
            _copy_input(graph, node)
        else:
            if position.get(anchor, -1) < position.get(node, -1):
                # the copy of a cut input is made after every placeholder: a moment at the input
                # itself is the copy's value as it is made (only placeholders lie in between)
                anchor = node
            with graph.inserting_after(anchor):
                snapshots[(node, moment)] = graph.call_function(copy_value, (node,))
    graph.output({key: fx.node.map_arg(value, functools.partial(_snapshot, snapshots, moment)) for key, (value, moment) in results.items()})
    for_torchscript(graph)
    graph.lint()
    extra = [str(n.target) for n in graph.nodes if n.op == "placeholder" and not any(n is c.placeholder for c in cut)]
    clash = sorted(set(extra) & {c.key for c in cut})
    if clash:
        raise CutError(
            f"the cut input key{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash))} also name{'' if len(clash) > 1 else 's'} "
            "a model input that the cut still reads: rename the cut input with a mapping {name: key}."
        )
    return Split(graph, [c.key for c in cut] + extra, extra, root)


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
    traced: _fx.Traced,
    outputs: dict[str, str],
    env: dict[fx.Node, fx.Node],
    cut: list[_Input],
    old_output: Any,
    order: dict[fx.Node, int],
    edited: _edits.Applied,
) -> tuple[list[tuple[fx.Node, fx.Node]], list[fx.Node], dict[str, tuple[Any, fx.Node]]]:
    """(value, moment) pairs wanted, nodes read at the end, and each output key's value (after
    the edits made at or before its moment, as for ``tap``)."""
    wanted: list[tuple[fx.Node, fx.Node]] = []
    end_reads: list[fx.Node] = []
    results: dict[str, tuple[Any, fx.Node]] = {}
    for name, key in outputs.items():
        if name == "output":
            value = fx.node.map_arg(old_output, lambda n: _after_cut(n, None, cut, order))
            end_reads += _nodes_of(value)
            results[key] = (value, None)  # type: ignore[assignment]
            continue
        value, moment = edited.point(name)
        value = fx.node.map_arg(value, functools.partial(_read_at, moment, cut, order))
        wanted += [(n, moment) for n in _nodes_of(value)]
        results[key] = (value, moment)
    return wanted, end_reads, results


def _after_cut(node: fx.Node, moment: fx.Node | None, cut: list[_Input], order: dict[fx.Node, int]) -> fx.Node:
    """A value read at ``moment`` (``None``: at the end): the cut input it is, if read after that input's moment."""
    for c in cut:
        if node is c.value and (moment is None or order[moment] >= order[c.moment]):
            return c.placeholder
    return node


def _read_at(moment: fx.Node, cut: list[_Input], order: dict[fx.Node, int], node: fx.Node) -> fx.Node:
    return _after_cut(node, moment, cut, order)


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


def _check_aliases(
    graph: fx.Graph, traced: _fx.Traced, root: nn.Module, cut: list[_Input], before: Any, order: dict[fx.Node, int], needed: set[fx.Node], names: Names
) -> None:
    """Refuse a cut input whose storage an in-place op the cut cannot reproduce writes to, before the cut reads it."""
    after = facts(graph, root)
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
            apart = _apart(graph, cut, c, before, after, needed)
            if apart is not None:  # the write reaches a value that shares c's memory in the model, not in the cut
                raise CutError(
                    f"cannot cut {type(traced.root).__name__} at {c.name!r}: {names.of(writer)!r} writes into it in place after the cut, "
                    f"and in the model that also changes {names.of(apart)!r} (the same memory), which the cut holds apart. "
                    "Cut after that op instead (see docs/cut.md)."
                )


def _apart(graph: fx.Graph, cut: list[_Input], c: _Input, before: Any, after: Any, needed: set[fx.Node]) -> fx.Node | None:
    """A value that shares ``c``'s memory in the model but not in the cut: another cut input, or a
    node the cut computes without reading ``c`` (``h`` when ``c`` is ``h.view(...)``)."""
    shared = before.find(c.value)
    mine = after.find(c.placeholder)
    for other in cut:
        if other is not c and before.find(other.value) is shared:
            return other.value
    for node in graph.nodes:
        if node in needed and node.op != "placeholder" and before.find(node) is shared and after.find(node) is not mine:
            return node
    return None


def _present(moment: fx.Node, needed: set[fx.Node], order: dict[fx.Node, int], graph: fx.Graph) -> fx.Node:
    """``moment`` if the cut runs it, else the last node the cut runs before it."""
    if moment is None or moment in needed:
        return moment
    earlier = [n for n in graph.nodes if n in order and order[n] <= order[moment]]
    return earlier[-1] if earlier else next(iter(graph.nodes))


def _copied_moment(copies: dict[fx.Node, fx.Node], moment: fx.Node) -> fx.Node:
    """A moment that is a copied cut input is its copy's (values are read from the copy, after it)."""
    return copies.get(moment, moment)


def _copy_written_inputs(graph: fx.Graph, root: nn.Module, cut: list[_Input]) -> dict[fx.Node, fx.Node]:
    """Copy, before anything runs, each cut input that an in-place op of the cut may write into,
    so that outputs read the copy as it is at their moment (the model's ``output``: after the
    write), and the caller's tensor is never changed. Returns each placeholder -> its copy."""
    kept = set(graph.nodes)
    return {c.placeholder: _copy_input(graph, c.placeholder) for c in cut if written_after(graph, root, c.placeholder, kept)}


def _copy_input(graph: fx.Graph, placeholder: fx.Node) -> fx.Node:
    """The graph writes into this cut input in place: work on a copy, never the caller's tensor."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        copy = graph.call_method("clone", (placeholder,))
    placeholder.replace_all_uses_with(copy, delete_user_cb=lambda u: u is not copy)
    return copy


def _nodes_of(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found
