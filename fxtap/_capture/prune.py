"""Dataflow over a traced graph: what must run for the requested values, and which values must be copied.

Two questions, answered together because both depend on in-place ops:

* **Which nodes run.** A node runs when a requested value needs it, when it mutates a tensor that
  something later still reads (``x.add_(pos)`` whose result is unused), when it is a random op
  that a later kept random op depends on for its RNG state, or when it is a guard
  (``torch._assert``) inside a module of which some code still runs. A guard alone never keeps
  pruned computation alive.
* **Which requested values are copied.** A value is returned as produced, unless a kept in-place
  op later writes to its storage (directly or through a view): then a clone is taken right
  after it is produced. Everything else is returned without a copy.

Aliasing is over-approximated: views, reshapes, ``getitem``, dtype or device conversions that may
return ``self``, in-place ops, and opaque (non-``torch.nn``) leaf modules are taken to share
storage with their inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from . import names as _names

__all__ = ["Plan", "from_torch_nn", "plan", "same_tensor", "written_after"]

_VIEW_LIKE = frozenset(
    """
    view view_as reshape reshape_as flatten unflatten squeeze unsqueeze transpose permute t T mT H mH
    adjoint expand expand_as broadcast_to broadcast_tensors narrow select split split_with_sizes chunk
    unbind tensor_split hsplit vsplit dsplit movedim moveaxis swapaxes swapdims diagonal as_strided
    unfold detach detach_ contiguous to type type_as float half double bfloat16 int long bool cpu cuda
    view_as_real view_as_complex real imag data alias getitem getattr atleast_1d atleast_2d atleast_3d
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout identity squeeze_ unsqueeze_
    """.split()
)
_INPLACE_OPERATORS = frozenset(getattr(operator, f"i{name}") for name in _names.INPLACE_OPERATORS) | {operator.setitem}
_RANDOM = frozenset(
    """
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout rand randn rand_like randn_like
    randint randint_like randperm bernoulli bernoulli_ multinomial normal normal_ uniform_ exponential_
    geometric_ cauchy_ log_normal_ random_ rrelu rrelu_ poisson gumbel_softmax
    """.split()
)
_GUARDS = frozenset({torch._assert, getattr(torch, "_assert_async", torch._assert), torch.fx._symbolic_trace._assert_is_none})


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
    copies = {(v, m): ops.anchor(m, kept) for v, m in wanted if ops.written_after(v, m, kept)}
    return Plan(frozenset(kept), copies)


def _scope(node: fx.Node) -> str:
    return str(node.meta.get("fxtap_scope", ""))


def _runs_in(scope: str, kept_scopes: set[str]) -> bool:
    return any(_names.inside(s, scope) for s in kept_scopes)


class _Ops:
    """Per-node facts of one graph: alias classes (union-find), writes, randomness, guards."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.root = root
        self._parent: dict[fx.Node, fx.Node] = {}
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        for node in self.nodes:
            for source in self._alias_sources(node):
                self._union(node, source)
            written = self._written_args(node)
            if written:
                self.writes[node] = written

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
        return self.root.get_submodule(str(node.target))

    def _alias_sources(self, node: fx.Node) -> list[fx.Node]:
        if node.op == "call_module":
            module = self._module(node)
            if _opaque(module) or getattr(module, "inplace", False) is True or isinstance(module, _PASS_THROUGH):
                return node.all_input_nodes
            return []
        if node.op == "call_function" and _opaque_function(node.target):
            return node.all_input_nodes
        if node.op in ("call_function", "call_method"):
            if _op_name(node) in _VIEW_LIKE or node.target in _INPLACE_OPERATORS or _is_inplace_call(node):
                return _first_input(node)
        return []

    def _written_args(self, node: fx.Node) -> list[fx.Node]:
        if node.op == "call_module":
            module = self._module(node)
            if getattr(module, "inplace", False) is True:
                return _first_input(node)
            return list(node.all_input_nodes) if _opaque(module) else []
        if node.op not in ("call_function", "call_method"):
            return []
        if node.op == "call_function" and _opaque_function(node.target):
            return list(node.all_input_nodes)
        written = _first_input(node) if node.target in _INPLACE_OPERATORS or _is_inplace_call(node) else []
        out = node.kwargs.get("out")
        written += [n for n in _flat_nodes(out)]
        return written

    # -- facts used by the plan ----------------------------------------------------------------
    def is_guard(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in _GUARDS

    def is_random(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return _may_draw_random(self._module(node))
        return node.op in ("call_function", "call_method") and _op_name(node) in _RANDOM

    def liveness(
        self, needed: set[fx.Node], wanted: list[tuple[fx.Node, fx.Node]], end_reads: list[fx.Node]
    ) -> set[fx.Node]:
        """Walk backwards from the end; return the nodes that must run."""
        needed = set(needed)
        read = {self.find(n) for n in end_reads}
        reads_at: dict[fx.Node, list[fx.Node]] = {}
        for value, moment in wanted:
            reads_at.setdefault(moment, []).append(value)
        kept: set[fx.Node] = set()
        rng_live = False
        for node in reversed(self.nodes):
            read.update(self.find(v) for v in reads_at.get(node, ()))  # a wanted value is read right after its moment
            keep = node in needed or node.op == "placeholder"
            if not keep and node in self.writes:
                keep = any(self.find(w) in read for w in self.writes[node])
            if not keep and rng_live and self.is_random(node):
                keep = True
            if not keep:
                continue
            kept.add(node)
            rng_live = rng_live or self.is_random(node)
            for source in node.all_input_nodes:
                needed.add(source)
                read.add(self.find(source))
        return kept

    def written_after(self, value: fx.Node, moment: fx.Node, kept: set[fx.Node]) -> bool:
        """Whether a kept node after ``moment`` writes into storage that ``value`` may share."""
        cls = self.find(value)
        position = self.order[moment]
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
    return _Ops(graph, root).written_after(node, node, set(kept))


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
        inplace = node.op in ("call_function", "call_method") and (node.target in _INPLACE_OPERATORS or _is_inplace_call(node))
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


_KNOWN_FUNCTION_PACKAGES = frozenset({"torch", "_operator", "operator", "builtins", "math", "fxtap"})


def _opaque_function(target: Any) -> bool:
    """A Python function FX kept as one call (``torch.fx.wrap``, autowrap): its body is unseen,
    so it may write into its arguments or return one of them (torchvision's ``_add_shortcut``
    and ``stochastic_depth`` do). Functions of torch itself are known by name instead."""
    package = (getattr(target, "__module__", None) or "").split(".")[0]
    return hasattr(target, "__code__") and package not in _KNOWN_FUNCTION_PACKAGES


def from_torch_nn(module: nn.Module) -> bool:
    """Whether ``module``'s class is ``torch.nn``'s own (code fxtap knows), not user code."""
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _opaque(module: nn.Module) -> bool:
    """A leaf whose code fxtap cannot see: assume it may return or write into its inputs.
    (fxtap's own tensor edit is known: it returns a tensor of its own and writes nothing.)"""
    return not from_torch_nn(module) and not getattr(module, "_fxtap_pure", False)


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


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    name = getattr(node.target, "__name__", "")
    if node.target is getattr:
        return "getattr"
    return name


def _is_inplace_call(node: fx.Node) -> bool:
    name = _op_name(node)
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    # a Python function with an ``inplace`` parameter passed positionally (F.relu(x, True));
    # read from the code object: inspect.signature is slow on builtins, which have no such flag
    code = getattr(node.target, "__code__", None) if node.op == "call_function" else None
    if code is None or "inplace" not in code.co_varnames[: code.co_argcount]:
        return False
    index = code.co_varnames.index("inplace")
    return len(node.args) > index and node.args[index] is True


def _first_input(node: fx.Node) -> list[fx.Node]:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return _flat_nodes(first)


def _flat_nodes(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found
