"""Dataflow over a traced graph: what must run for the requested values, and which values must be copied.

Two questions, answered together because both depend on in-place ops:

* **Which nodes run.** A node runs when a requested value needs it, when it mutates a tensor that
  something later still reads (``x.add_(pos)`` whose result is unused), when it changes state
  that outlives the call, or when it is a guard (``torch._assert``) inside a module of which some
  code still runs. A guard alone never keeps pruned computation alive. State that outlives the
  call, which pruning never drops, is: a write into a buffer, a parameter or an input (the next
  call, or the caller, reads it: a KV cache, an EMA, a queue and its pointer, a counter); a
  ``torch.nn`` module that updates its buffers (batch norm in training); a leaf whose code
  fxtap cannot see that has buffers or is in training mode; and every draw from the random
  number generator (the generator's state is read by the next call: pruning a dropout at the
  end of a train-mode model would change every later mask).
* **Which requested values are copied.** A value is returned as produced, unless a kept in-place
  op later writes to its storage (directly or through a view), or it shares storage with a
  buffer, parameter or input that the graph writes into (the next call would overwrite it): then
  a clone is taken right after it is produced. Everything else is returned without a copy.

What an op writes, returns a view of and whether it draws from the RNG is read from its schema
(``effects``). Aliasing is over-approximated: views, reshapes, ``getitem``, dtype or device
conversions that may return ``self``, in-place ops, and opaque (non-``torch.nn``) leaf modules
are taken to share storage with their inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .._values import assert_is_none
from . import effects as _effects
from . import names as _names

__all__ = ["Plan", "drop_copies", "facts", "from_torch_nn", "may_change_state", "own_class", "plan", "same_tensor", "written_after"]

_GUARDS = frozenset({torch._assert, getattr(torch, "_assert_async", torch._assert), torch.fx._symbolic_trace._assert_is_none, assert_is_none})


class Plan(NamedTuple):
    """What to keep of a graph, and where to copy wanted values (``(value, moment) -> anchor``:
    insert the copy right after ``anchor``)."""

    kept: frozenset[fx.Node]
    copies: dict[tuple[fx.Node, fx.Node], fx.Node]


def plan(
    graph: fx.Graph, root: nn.Module, wanted: Iterable[tuple[fx.Node, fx.Node]], end_reads: Iterable[fx.Node]
) -> Plan:
    """Decide which nodes of ``graph`` run and which wanted values need a copy.

    Args:
        graph: the traced graph (its output node is ignored).
        root: the module that owns the graph's ``call_module`` targets.
        wanted: ``(value, moment)`` pairs: the value is requested as it is right after node
            ``moment`` ran (a module's output is final when the module's last node ran, and
            an in-place op inside the module before that point is part of it).
        end_reads: nodes whose values are read after everything ran (the model's own output).
    """
    ops = _Ops(graph, root)
    wanted = list(dict.fromkeys(wanted))
    end_reads = list(end_reads)
    kept = ops.liveness({v for v, _ in wanted} | set(end_reads), wanted, end_reads)
    scopes = {_scope(n) for n in kept if not ops.is_guard(n)}
    guards = [n for n in graph.nodes if ops.is_guard(n) and _runs_in(_scope(n), scopes)]
    if guards:
        kept = ops.liveness(kept | set(guards), wanted, end_reads)
    copies = {(v, m): ops.anchor(m, kept) for v, m in wanted if ops.overwritten(v, m, kept)}
    return Plan(frozenset(kept), copies)


def facts(graph: fx.Graph, root: nn.Module) -> _Ops:
    """The storage facts of ``graph``: ``.find(node)`` is a node's alias class (nodes that may
    share storage have the same class), ``.writes`` maps each in-place node to the nodes it writes."""
    return _Ops(graph, root)


def _scope(node: fx.Node) -> str:
    return str(node.meta.get("fxtap_scope", ""))


def _runs_in(scope: str, kept_scopes: set[str]) -> bool:
    return any(_names.inside(s, scope) for s in kept_scopes)


class _Ops:
    """Per-node facts of one graph: alias classes (union-find), writes, state effects, guards."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.root = root
        self._parent: dict[fx.Node, fx.Node] = {}
        self._modules: dict[fx.Node, nn.Module] = {}
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        self.effects: set[fx.Node] = set()  # nodes that change state outliving the call
        attributes: dict[str, fx.Node] = {}
        for node in self.nodes:
            if node.op == "get_attr":  # two reads of one buffer are one storage
                self._union(node, attributes.setdefault(str(node.target), node))
            for source in self._alias_sources(node):
                self._union(node, source)
            written = self._written_args(node)
            if written:
                self.writes[node] = written
            if self._changes_state(node):
                self.effects.add(node)
        # buffers, parameters and inputs are read after the call: by the next call, or the caller
        self.state = {self.find(n) for n in self.nodes if n.op in ("get_attr", "placeholder")}

    # -- alias classes -------------------------------------------------------------------------
    def find(self, node: fx.Node) -> fx.Node:
        while node in self._parent:
            node = self._parent[node]
        return node

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def _module(self, node: fx.Node) -> nn.Module:
        module = self._modules.get(node)
        if module is None:  # get_submodule walks and checks the path: once per node
            module = self._modules[node] = self.root.get_submodule(str(node.target))
        return module

    def _alias_sources(self, node: fx.Node) -> list[fx.Node]:
        if node.op == "call_module":
            module = self._module(node)
            if _opaque(module) or getattr(module, "inplace", False) is True or isinstance(module, _PASS_THROUGH):
                return node.all_input_nodes
            return []
        if node.op in ("call_function", "call_method"):
            return _effects.aliased(node)
        return []

    def _written_args(self, node: fx.Node) -> list[fx.Node]:
        if node.op == "call_module":
            module = self._module(node)
            if getattr(module, "inplace", False) is True:
                return _first_input(node)
            return list(node.all_input_nodes) if _opaque(module) else []
        if node.op in ("call_function", "call_method"):
            return _effects.written(node)
        return []

    def _changes_state(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return may_change_state(self._module(node))
        return _effects.draws_random(node)

    # -- facts used by the plan ----------------------------------------------------------------
    def is_guard(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in _GUARDS

    def liveness(
        self, needed: set[fx.Node], wanted: list[tuple[fx.Node, fx.Node]], end_reads: list[fx.Node]
    ) -> set[fx.Node]:
        """Walk backwards from the end; return the nodes that must run."""
        needed = set(needed)
        read = {self.find(n) for n in end_reads} | self.state
        reads_at: dict[fx.Node, list[fx.Node]] = {}
        for value, moment in wanted:
            reads_at.setdefault(moment, []).append(value)
        kept: set[fx.Node] = set()
        rng_live = False
        for node in reversed(self.nodes):
            read.update(self.find(v) for v in reads_at.get(node, ()))  # a wanted value is read right after its moment
            keep = node in needed or node.op == "placeholder" or node in self.effects
            if not keep and node in self.writes:
                keep = any(self.find(w) in read for w in self.writes[node])
            if not keep and rng_live and self.may_draw(node):
                keep = True
            if not keep:
                continue
            kept.add(node)
            rng_live = rng_live or self.may_draw(node)
            for source in node.all_input_nodes:
                needed.add(source)
                read.add(self.find(source))
        return kept

    def may_draw(self, node: fx.Node) -> bool:
        """Whether ``node`` may draw from the RNG (an opaque leaf may, whatever its mode): the
        random ops before a kept one must run, or it would draw other numbers than eagerly."""
        if node.op == "call_module":
            return _may_draw_random(self._module(node))
        return node in self.effects

    def overwritten(self, value: fx.Node, moment: fx.Node, kept: set[fx.Node]) -> bool:
        """Whether a kept node writes into storage that ``value`` may share: after ``moment``,
        or anywhere when that storage is a buffer, parameter or input (the next call writes it)."""
        cls = self.find(value)
        position = -1 if cls in self.state else self.order[moment]
        return any(
            self.order[writer] > position and writer in kept and any(self.find(w) is cls for w in written)
            for writer, written in self.writes.items()
        )

    def anchor(self, moment: fx.Node, kept: set[fx.Node]) -> fx.Node:
        """The last kept node at or before ``moment``: a copy placed after it sees the value at ``moment``."""
        for node in reversed(self.nodes[: self.order[moment] + 1]):
            if node in kept:
                return node
        raise AssertionError(f"expected a kept node at or before {moment}, found none")


def written_after(graph: fx.Graph, root: nn.Module, node: fx.Node, kept: Iterable[fx.Node]) -> bool:
    """Whether a node of ``kept`` after ``node`` writes into storage that ``node``'s value may share."""
    return _Ops(graph, root).overwritten(node, node, set(kept))


def drop_copies(graph: fx.Graph, root: nn.Module, positions: Iterable[int]) -> int:
    """Return the value itself instead of the copy that a hook took of it, at these positions of
    the graph's (flat) output, where the copy is not needed by ``plan``'s rule: no op after the
    copy writes into storage the value may share, and that storage is not a buffer, parameter
    or input. An export graph records the hooks' copies (a hook cannot know what runs later);
    this graph does. Returns how many copies were dropped."""
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (list, tuple)):
        return 0
    ops = _Ops(graph, root)
    kept = set(ops.nodes)
    returned = list(flat)
    dropped: list[fx.Node] = []
    for position in positions:
        copy = returned[position]
        if not (
            isinstance(copy, fx.Node)
            and copy.op == "call_function"
            and copy.target is torch.ops.aten.clone.default
            and len(copy.args) == 1
            and not copy.kwargs
            and list(copy.users) == [output]
            and returned.count(copy) == 1
            and isinstance(copy.args[0], fx.Node)
        ):
            continue
        value = copy.args[0]
        if ops.find(value) in ops.state or ops.overwritten(value, copy, kept):
            continue
        returned[position] = value
        dropped.append(copy)
    if dropped:
        output.args = (type(flat)(returned),)
        for copy in dropped:  # the output was its one user
            graph.erase_node(copy)
    return len(dropped)


def same_tensor(graph: fx.Graph, root: nn.Module) -> Any:
    """A function giving, for a node, the nodes that are the same tensor object: an in-place
    op's result and the tensor it wrote into (``x.relu_()``, ``x += y``, ``ReLU(inplace=True)``)."""
    ops = _Ops(graph, root)
    groups: dict[fx.Node, list[fx.Node]] = {}
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while node in parent:
            node = parent[node]
        return node

    for node in ops.nodes:
        inplace = node.op in ("call_function", "call_method") and _effects.inplace(node)
        if node.op == "call_module":
            inplace = getattr(ops._module(node), "inplace", False) is True
        if inplace and node.target is not operator.setitem:
            for source in _first_input(node):
                a, b = find(node), find(source)
                if a is not b:
                    parent[a] = b
    for node in ops.nodes:
        groups.setdefault(find(node), []).append(node)
    return lambda node: groups.get(find(node), [node])


_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def from_torch_nn(module: nn.Module) -> bool:
    """Whether ``module``'s class is ``torch.nn``'s own (code fxtap knows), not user code.

    A parametrized module's class is made in ``torch.nn.utils.parametrize``: the class it was
    made from decides (a parametrized user block is still the user's code)."""
    return own_class(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


def own_class(module: nn.Module) -> type:
    """``module``'s class, or for a parametrized module the class it was made from."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _opaque(module: nn.Module) -> bool:
    """A leaf whose code fxtap cannot see: assume it may return or write into its inputs.
    (fxtap's own tensor edit is known: it returns a tensor of its own and writes nothing.)"""
    return not from_torch_nn(module) and not getattr(module, "_fxtap_pure", False)


def may_change_state(module: nn.Module) -> bool:
    """Whether calling ``module`` may change state that outlives the call, so that it must run
    even when no requested value needs it.

    A ``torch.nn`` module in training mode with buffers updates them (batch norm's running
    statistics), and one in training mode may draw from the RNG (dropout). Code fxtap cannot see
    (any other module, here or inside) may write its own buffers in any mode, and may do
    anything in training mode. Not covered: such code without buffers of its own that draws
    random numbers or changes Python attributes in eval mode.
    """
    return any(_changes_own_state(m) for m in module.modules())


def _changes_own_state(module: nn.Module) -> bool:
    own_buffers = next(module.buffers(recurse=False), None) is not None
    if _opaque(module):
        return module.training or own_buffers
    return module.training and (own_buffers or _may_draw_random(module))


def _may_draw_random(module: nn.Module) -> bool:
    """Whether calling ``module`` may draw from the RNG: code outside ``torch.nn`` (an opaque
    leaf) may call anything; ``torch.nn`` modules draw only in training, through dropout."""
    if _opaque(module):
        return True
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.RReLU):
        return True
    dropout = getattr(module, "dropout", None)  # MultiheadAttention's attention dropout
    if isinstance(dropout, float) and dropout > 0:
        return True
    return any(_may_draw_random(child) for child in module.children())


def _first_input(node: fx.Node) -> list[fx.Node]:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return _flat_nodes(first)


def _flat_nodes(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found
