"""Which nodes of a cut call's export graph the cut runs (``export_graph``): the walk back from the
outputs, what lies before the cut (upstream), and which state writes run.

Dependence on the model's inputs follows tensor values only: a size read (``sym_size``) is not a
read of values, so positions built from a sequence length are not upstream. Names come from the
nodes' ``nn_module_stack``: the module of the model a value escapes from is its tap name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from .._errors import CutError

__all__ = ["PREFIX", "Walk", "ancestors", "descendants", "inside", "random", "state_writes", "upstream_of"]

PREFIX = "model."  # the model's modules, as the cut call names them


class Walk:
    """From the outputs backwards: what the cut runs, the model inputs it reads, what is missing."""

    def __init__(
        self, graph: fx.Graph, upstream: set[fx.Node], model_inputs: set[fx.Node], given: list[fx.Node], owner: str, names_of: dict[fx.Node, str],
        is_tensor: Callable[[str], bool],
    ) -> None:
        self.graph, self.upstream, self.model_inputs, self.given, self.owner = graph, upstream, model_inputs, given, owner
        self.names_of = names_of  # tap names of ops, where the call was asked for them
        self.is_tensor = is_tensor  # whether a tap name's value is one tensor (at the example)
        self.needed: set[fx.Node] = set(given)
        self.missing: dict[str, None] = {}
        self.inside: dict[str, None] = {}  # modules holding needed ops from before the cut that no name names
        self.shapes: dict[fx.Node, tuple[fx.Node, int]] = {}  # a size read of a model input -> (cut input, dim)

    def run(self, seeds: list[fx.Node]) -> None:
        stack: list[tuple[fx.Node, fx.Node | None]] = [(seed, None) for seed in seeds]
        while stack:
            node, user = stack.pop()
            if node in self.needed:
                continue
            if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int and node.args[0] in self.model_inputs:
                found = self._from_given(node)
                if found is not None:
                    self.shapes[node] = found
                    self.needed.add(node)
                    continue
            if node in self.upstream and node.op != "placeholder":
                module = inside(node)
                if module:
                    name = _escaping(node, user, self.is_tensor) or self.names_of.get(node, "")
                    if name:
                        self.missing[name] = None
                    else:
                        self.inside[module] = None
                    continue
                if random(node):
                    raise CutError(
                        f"cannot cut {self.owner}: the outputs need a random draw ({node.target}) that the model's forward makes "
                        "before the cut from the model's inputs; the cut would draw it again. Cut before it, or add it to the inputs."
                    )
            self.needed.add(node)
            stack.extend((source, node) for source in node.all_input_nodes)
        self.missing = dict(sorted(self.missing.items()))

    def _from_given(self, read: fx.Node) -> tuple[fx.Node, int] | None:
        want = read.meta.get("val")
        if not isinstance(want, torch.SymInt):
            return None
        for node in self.given:
            for i, size in enumerate(node.meta["val"].shape):
                if isinstance(size, torch.SymInt) and size.node.expr == want.node.expr:
                    return node, i
        return None


def state_writes(
    writes: list[tuple[str, str, fx.Node]], derived: set[fx.Node], data: set[fx.Node], order: dict[fx.Node, int], last: int, needed: set[fx.Node]
) -> list[tuple[str, str, fx.Node]]:
    """The state writes the cut runs, per module call (a batch norm's statistics and its counter
    together): a call that reads a cut input, or whose result the outputs need, or that reads no
    model input and runs after the last cut point. Calls before the cut, and calls on other
    branches that read only model inputs and that the outputs do not need, do not run (as on FX)."""
    needed_calls = {_call(n) for n in needed} - {""}
    derived_calls = {_call(v) for _, _, v in writes if v in derived} - {""}
    data_calls = {_call(v) for _, _, v in writes if v in data and v not in derived} - {""}  # before the cut, or a side branch

    def runs(value: fx.Node) -> bool:
        call = _call(value)
        if value in derived or call in needed_calls | derived_calls:
            return True
        return call not in data_calls and value not in data and order[value] > last

    return [(kind, target, value) for kind, target, value in writes if runs(value)]


def _call(node: fx.Node) -> str:
    """The innermost module call that ran ``node`` (torch.export's key: ``path@k`` for a later call)."""
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if not stack or not str(stack[-1][1][0]).startswith(PREFIX):
        return ""  # the model's own forward (or fxtap's call around it): not one module call
    return str(stack[-1][0])


def random(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _is_value(node: fx.Node) -> bool:
    """Whether ``node`` carries tensor values (not a size: reading a size is not reading values)."""
    return not isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def descendants(graph: fx.Graph, start: set[fx.Node]) -> set[fx.Node]:
    found = set(start)
    for node in graph.nodes:
        if any(s in found and _is_value(s) for s in node.all_input_nodes):
            found.add(node)
    return found


def ancestors(node: fx.Node) -> set[fx.Node]:
    found: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


def upstream_of(graph: fx.Graph, model_inputs: set[fx.Node], replaced: list[fx.Node]) -> set[fx.Node]:
    """Values computed from the model inputs' values that the replaced values are computed from,
    and values that read a replaced value."""
    data = descendants(graph, model_inputs)
    upstream: set[fx.Node] = set()
    stack = list(replaced)
    while stack:
        node = stack.pop()
        if node in upstream or node not in data:
            continue
        upstream.add(node)
        stack.extend(s for s in node.all_input_nodes if _is_value(s))
    return upstream | (descendants(graph, set(replaced)) & data)


def _stack(node: fx.Node) -> list[str]:
    """The model's module paths the node ran in, outermost first."""
    return [path[len(PREFIX) :] for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path.startswith(PREFIX)]


def inside(node: fx.Node) -> str:
    """The innermost submodule of the model that ``node`` ran in ("" for the model's own forward)."""
    paths = _stack(node)
    return paths[-1] if paths else ""


def _escaping(node: fx.Node, user: fx.Node | None, is_tensor: Callable[[str], bool]) -> str:
    """The tap name of the module that returns ``node`` to ``user``: of the modules ``node`` ran in
    that ``user`` did not, the outermost whose value is one tensor (``is_tensor``; a module may
    return it inside a tuple). "" when there is none (an op of a module's own code, named by
    exporting again with that module's ops tapped)."""
    theirs = set(_stack(user)) if user is not None else set()
    return next((path for path in _stack(node) if path not in theirs and is_tensor(path)), "")
