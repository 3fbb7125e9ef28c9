"""The graph of a cut, from the functional torch.export graph of the cut call (``export_cut.py``).

In that graph each cut input is a ``fxtap::cut_point(value, given)`` node: ``value`` is what the
model computed, ``given`` the cut's argument. ``cut_graph`` replaces each by ``given`` and keeps
what the outputs need, by these rules (those of the FX cut, docs/cut.md, where the graph allows):

- **Upstream** values are the ones computed from the model's input *values* (shape reads do not
  count) that the cut inputs are computed from (their ancestors), or that read the replaced value.
  The cut never runs them, with one exception: code of the model's own ``forward`` (no submodule),
  such as attention masks and position ids built from the model inputs, which the cut runs again;
  the model inputs it reads become arguments of the cut, after the cut inputs.
- A needed upstream value computed *inside a submodule* (a skip connection that bypasses the cut)
  is missing: ``CutError`` lists the tap name of the module that returns it (``.missing``).
- **Shape reads** of a model input (``input_ids.shape[1]`` for positions) are taken from a cut
  input's dimension where torch.export proved the two equal; else the model input is an argument.
- **State writes** (buffer updates; the graph is functional, they are its outputs) run per module
  call (``_state_writes``): a call that reads a cut input, whose result the outputs need, or that
  reads no model input and runs after the last cut point; not calls before the cut or beside it.
  They are written back with ``copy_`` at the end (the graph reads a written buffer through a
  copy, which autograd may save). Writes into a cut input never reach the caller's tensor. Random
  ops after the last cut point run.
- Dimensions: the graph holds the sizes torch.export kept static, and its symbols' ranges:
  ``Shapes`` checks a call against them (another static size must be exported again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .._capture.outputs import _CONSTANTS, Outputs, _Slot
from .._errors import CutError, FxtapError

__all__ = ["Built", "Shapes", "Unnamed", "cut_graph"]

_PREFIX = "model."  # the model's modules, as the cut call names them


@dataclass
class Shapes:
    """What a call's tensors must satisfy: static sizes, symbols equal, symbols in range."""

    dims: list[tuple[str, list[Any]]]  # per input: its key, each dim an int or a sympy expression
    ranges: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    owner: str = ""
    dtypes: list[torch.dtype] = field(default_factory=list)  # per input

    def check(self, values: tuple[Any, ...]) -> None:
        bound: dict[Any, int] = {}
        problems: list[str] = []
        for index, ((key, dims), value) in enumerate(zip(self.dims, values)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"the cut's input {key!r} must be a tensor, not {type(value).__name__}")
            if self.dtypes and value.dtype != self.dtypes[index]:
                problems.append(f"{key!r} is {value.dtype}, the graph holds {self.dtypes[index]}")
            if value.dim() != len(dims):
                problems.append(f"{key!r} has {value.dim()} dimensions, not {len(dims)}")
                continue
            for i, (want, have) in enumerate(zip(dims, value.shape)):
                if isinstance(want, int):
                    if want != have:
                        problems.append(f"{key!r} dim {i} is {have}, the graph holds {want}")
                elif isinstance(want, sympy.Symbol):
                    low, high = self.ranges.get(want, (0, None))
                    if want in bound and bound[want] != have:
                        problems.append(f"{key!r} dim {i} is {have}, but must equal {bound[want]} (the same size in the model)")
                    elif have < low or (high is not None and have > high):
                        why = " (torch.export keeps sizes 0 and 1 out of a dynamic dimension)" if have < 2 <= low + 1 else ""
                        problems.append(f"{key!r} dim {i} is {have}, outside the range {low}..{high or ''} the graph was exported for{why}")
                    bound[want] = have
        for (key, dims), value in zip(self.dims, values):
            for i, want in enumerate(dims):
                if not isinstance(want, (int, sympy.Symbol)) and want.free_symbols <= bound.keys() and int(want.subs(bound)) != value.shape[i]:
                    problems.append(f"{key!r} dim {i} is {value.shape[i]}, the graph needs {want.subs(bound)}")
        if problems:
            raise FxtapError(
                f"this cut of {self.owner} is one torch.export graph, exported at the example's sizes: "
                + "; ".join(problems)
                + ".\n  Build the cut again with an example of these sizes and dtypes (sizes torch.export keeps dynamic may differ)."
            )


class Unnamed(CutError):
    """A needed value from before the cut that an op inside a module computes, not named yet."""

    def __init__(self, message: str, modules: list[str]) -> None:
        super().__init__(message)
        self.modules = modules


@dataclass
class Built:
    """A cut's graph module and its arguments (cut input keys, then model inputs)."""

    module: fx.GraphModule
    inputs: list[str]
    shapes: Shapes
    rebuild: Any = None  # when the graph returns tensors only: makes the dict of outputs around them


def cut_graph(
    program: Any, call: nn.Module, model: nn.Module, inputs: dict[str, str], outputs: dict[str, str], model_names: list[str], named: Sequence[str] = ()
) -> Built:
    """The cut's ``GraphModule`` from ``program`` (``run_decompositions``'d export of ``call``);
    ``named``: tap names the call also returns, after the outputs, to name missing values."""
    owner = type(model).__name__
    graph: fx.Graph = program.graph_module.graph
    signature = program.graph_signature
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    user = [by_name[s.arg.name] for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    given, model_inputs = user[: len(inputs)], user[len(inputs) :]
    keys = list(inputs.values())
    names = dict(zip(model_inputs, model_names))
    points = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.fxtap.cut_point.default]
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max((order[p] for p in points), default=-1)
    replaced = [p.args[0] for p in points]
    for point in points:
        point.replace_all_uses_with(point.args[1])
    derived = _descendants(graph, set(given))
    upstream = _upstream(graph, set(model_inputs), replaced)

    output_node = next(n for n in graph.nodes if n.op == "output")
    results = list(output_node.args[0])
    user_out: list[Any] = []
    writes: list[tuple[str, str, fx.Node]] = []  # (kind, target, value)
    for spec, value in zip(signature.output_specs, results):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_out.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            writes.append(("buffer", spec.target, value))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            writes.append(("input", spec.target, value))
        else:
            raise CutError(f"cannot cut {owner}: its torch.export graph has an output of kind {spec.kind.name}, which a cut does not reproduce")
    writes = [(kind, target, value) for kind, target, value in writes if isinstance(value, fx.Node) and not (kind == "input" and by_name[target] in given)]

    parts: list[tuple[Outputs, int]] = call.__dict__["parts"]  # per key of the call: how its value is rebuilt, and its tensors
    chunks: list[list[Any]] = []
    for _, count in parts:
        chunks.append(user_out[:count])
        user_out = user_out[count:]
    names_of: dict[fx.Node, str] = {}
    for name, chunk in zip(named, chunks[len(outputs) :]):
        if len(chunk) == 1 and isinstance(value := chunk[0], fx.Node):
            names_of.setdefault(value, name)
            if value.target is torch.ops.aten.clone.default and isinstance(value.args[0], fx.Node):  # the tap's copy of the value
                names_of.setdefault(value.args[0], name)
    parts, chunks = parts[: len(outputs)], chunks[: len(outputs)]
    user_out = [v for chunk in chunks for v in chunk]
    early = [name for name, chunk in zip(outputs, chunks) if name != "output" and any(isinstance(v, fx.Node) and v in upstream and v.op != "placeholder" for v in chunk)]
    if early:
        raise CutError(
            f"cannot cut {owner} at {', '.join(map(repr, inputs))}: the output{'s' if len(early) > 1 else ''} "
            f"{', '.join(map(repr, early))} {'are' if len(early) > 1 else 'is'} computed before the cut.\n"
            "  Add them to the inputs (the cut then returns them as given), or ask for outputs after the cut; see docs/cut.md.",
            missing=early,
        )
    randoms = [n for n in graph.nodes if (order.get(n, -1) > last or n in derived) and _random(n) and not (_ancestors(n) & upstream)]
    walk = _Walk(graph, upstream, set(model_inputs), given, owner, names_of)
    walk.run([v for v in user_out if isinstance(v, fx.Node)] + randoms)
    kept_writes = _state_writes(writes, derived, _descendants(graph, set(model_inputs)), order, last, walk.needed)
    walk.run([v for _, _, v in kept_writes])
    within = [m for m in [*walk.missing, *walk.inside] if any(m == i or m.startswith(f"{i}.") for i in inputs)]
    if within:  # produced inside a cut input's module, but not its output: no tap name gives it to the cut
        raise CutError(
            f"cannot cut {owner} at {', '.join(map(repr, inputs))}: the outputs {', '.join(map(repr, outputs))} need values that "
            f"{', '.join(map(repr, dict.fromkeys(within)))} computes before the cut besides what it returns (the key/value cache a "
            "decoder returns in its output, for one).\n  Ask for outputs that do not hold them (for a transformers decoder's "
            "output: pass use_cache=False in example), or cut before that module; see docs/cut.md."
        )
    if walk.missing and not walk.inside:
        listed = ", ".join(map(repr, walk.missing))
        raise CutError(
            f"cannot cut {owner} at {', '.join(map(repr, inputs))}: the outputs {', '.join(map(repr, outputs))} also need "
            f"{listed}, which {'is' if len(walk.missing) == 1 else 'are'} computed before the cut from the model's inputs.\n"
            f"  Add {'it' if len(walk.missing) == 1 else 'them'} to the inputs: fxtap.cut(model, {[*inputs, *walk.missing]!r}, ...); see docs/cut.md.",
            missing=list(walk.missing),
        )
    if walk.inside:
        listed = ", ".join(map(repr, walk.inside))
        raise Unnamed(
            f"cannot cut {owner} at {', '.join(map(repr, inputs))}: the outputs also need a value computed before the cut "
            f"from the model's inputs by an op inside {listed}, which no tap name names here (or a state update there, "
            "such as batch norm's running statistics of a module that runs both before and after the cut).\n"
            "  Cut after it, or add the output of a module that returns it to the inputs; see docs/cut.md.",
            list(walk.inside),
        )
    return _assemble(program, call, graph, given, keys, model_inputs, names, walk, (parts, chunks), outputs, kept_writes, owner)


def _assemble(
    program: Any, call: nn.Module, graph: fx.Graph, given: list[fx.Node], keys: list[str], model_inputs: list[fx.Node], names: dict[fx.Node, str],
    walk: _Walk, results: tuple[list[tuple[Outputs, int]], list[list[Any]]], outputs: dict[str, str], writes: list[tuple[str, str, fx.Node]], owner: str,
) -> Built:
    signature = program.graph_signature
    targets = {s.arg.name: (s.kind, s.target) for s in signature.input_specs if s.kind != InputKind.USER_INPUT}
    root = nn.Module()
    root.call = call
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    extra = [n for n in model_inputs if n in walk.needed]
    clash = sorted({names[n] for n in extra} & set(keys))
    if clash:
        raise CutError(f"the cut input key(s) {', '.join(map(repr, clash))} also name a model input that the cut still reads: rename the cut input with a mapping {{name: key}}.")
    arguments = [*given, *extra]
    argument_names = [*keys, *(names[n] for n in extra)]
    # a written buffer or model input is read through a copy: the write at the end must not change
    # a tensor that autograd saved (train-mode batch norm saves the running statistics it reads)
    written = {target for _, target, _ in writes}
    placeholders: dict[str, fx.Node] = {}
    taken: set[str] = set()
    for node, name in zip(arguments, argument_names):
        identifier = _identifier(name)
        while identifier in taken:  # "a.b" and "a_b": both a_b
            identifier += "_"
        taken.add(identifier)
        env[node] = placeholders[node.name] = new.placeholder(identifier)
        env[node].meta = dict(node.meta)
    for node in arguments:
        if node.name in written:
            env[node] = new.call_function(torch.ops.aten.clone.default, (env[node],))
    for node in graph.nodes:
        if node not in walk.needed or node in env:
            continue
        if node.op == "placeholder":
            kind, target = targets[node.name]
            if kind == InputKind.CONSTANT_TENSOR:
                attribute = f"_constant{len(root._buffers)}"
                root.register_buffer(attribute, program.constants[target], persistent=False)
                env[node] = new.get_attr(attribute)
            elif kind in (InputKind.PARAMETER, InputKind.BUFFER):
                env[node] = new.get_attr(f"call.{target}")
                if target in written:
                    env[node] = new.call_function(torch.ops.aten.clone.default, (env[node],))
            else:
                raise CutError(f"cannot cut {owner}: its torch.export graph takes a {kind.name} input, which a cut does not reproduce")
            env[node].meta = dict(node.meta)
            continue
        replacement = walk.shapes.get(node)
        if replacement is not None:
            source, dim = replacement
            env[node] = new.call_function(torch.ops.aten.sym_size.int, (env[source], dim))
            env[node].meta = dict(node.meta)
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
    for kind, target, value in writes:  # a state write records no gradient (batch norm's runs under no_grad)
        destination = new.get_attr(f"call.{target}") if kind == "buffer" else placeholders[target]
        new.call_function(torch.ops.aten.copy_.default, (destination, new.call_function(torch.ops.aten.detach.default, (env[value],))))
    parts, chunks = results
    values = [[env[v] if isinstance(v, fx.Node) else v for v in chunk] for chunk in chunks]
    rebuild = None
    if all(_plain(part) for part, _ in parts):  # tensors and constants in pytree containers: the graph returns the dict
        flat = [v for (part, _), chunk in zip(parts, values) for v in _leaves(part, chunk)]
        structure = pytree.treespec_dict({key: part.spec for key, (part, _) in zip(outputs.values(), parts)})
    else:  # objects to make anew (a transformers cache): the graph returns the tensors, the Cut rebuilds the dict
        flat = [v for chunk in values for v in chunk]
        structure = pytree.tree_structure(list(flat))
        rebuild = _Rebuild(list(outputs.values()), parts)
    new.output(flat)
    in_spec = pytree.tree_structure((tuple(range(len(arguments))), {}))
    new._codegen = _PyTreeCodeGen(_PyTreeInfo([env[n].name for n in arguments], in_spec, structure))
    new.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _random(n))
    module = fx.GraphModule(root, new, class_name=f"Cut{owner}")
    module.meta["fxtap_input_names"] = list(argument_names)
    dims = [(name, [_dim(s) for s in node.meta["val"].shape]) for name, node in zip(argument_names, arguments)]
    ranges = {symbol: (_bound(r.lower, 0), _bound(r.upper, None)) for symbol, r in program.range_constraints.items() if isinstance(symbol, sympy.Symbol)}
    return Built(module, argument_names, Shapes(dims, ranges, owner, [node.meta["val"].dtype for node in arguments]), rebuild)


def _plain(part: Outputs) -> bool:
    return all(isinstance(c, (_Slot, *_CONSTANTS)) for c in part.constants)


def _leaves(part: Outputs, computed: list[Any]) -> list[Any]:
    return [computed[c.position] if isinstance(c, _Slot) else c for c in part.constants]


class _Rebuild:
    """The dict of a cut whose outputs hold objects the call makes: each value rebuilt around the graph's tensors."""

    def __init__(self, keys: list[str], parts: list[tuple[Outputs, int]]) -> None:
        self.keys, self.parts = keys, parts

    def __call__(self, flat: list[Any]) -> dict[str, Any]:
        result, start = {}, 0
        for key, (part, count) in zip(self.keys, self.parts):
            result[key] = part.rebuild(list(flat[start : start + count]))
            start += count
        return result


def _bound(value: Any, default: int | None) -> int | None:
    try:
        return int(value) if sympy.sympify(value).is_finite else default
    except (TypeError, ValueError, AttributeError):
        return default


def _dim(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


class _Walk:
    """From the outputs backwards: what the cut runs, the model inputs it reads, what is missing."""

    def __init__(
        self, graph: fx.Graph, upstream: set[fx.Node], model_inputs: set[fx.Node], given: list[fx.Node], owner: str, names_of: dict[fx.Node, str]
    ) -> None:
        self.graph, self.upstream, self.model_inputs, self.given, self.owner = graph, upstream, model_inputs, given, owner
        self.names_of = names_of  # tap names of ops, where the call was asked for them
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
                inside = _inside(node)
                if inside:
                    name = _escaping(node, user) or self.names_of.get(node, "")
                    if name:
                        self.missing[name] = None
                    else:
                        self.inside[inside] = None
                    continue
                if _random(node):
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


def _state_writes(
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
    if not stack or not str(stack[-1][1][0]).startswith(_PREFIX):
        return ""  # the model's own forward (or fxtap's call around it): not one module call
    return str(stack[-1][0])


def _random(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _is_value(node: fx.Node) -> bool:
    """Whether ``node`` carries tensor values (not a size: reading a size is not reading values)."""
    return not isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _descendants(graph: fx.Graph, start: set[fx.Node]) -> set[fx.Node]:
    found = set(start)
    for node in graph.nodes:
        if any(s in found and _is_value(s) for s in node.all_input_nodes):
            found.add(node)
    return found


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


def _upstream(graph: fx.Graph, model_inputs: set[fx.Node], replaced: list[fx.Node]) -> set[fx.Node]:
    """Values computed from the model inputs' values that the replaced values are computed from,
    and values that read a replaced value."""
    data = _descendants(graph, model_inputs)
    upstream: set[fx.Node] = set()
    stack = list(replaced)
    while stack:
        node = stack.pop()
        if node in upstream or node not in data:
            continue
        upstream.add(node)
        stack.extend(s for s in node.all_input_nodes if _is_value(s))
    return upstream | (_descendants(graph, set(replaced)) & data)


def _stack(node: fx.Node) -> list[str]:
    """The model's module paths the node ran in, outermost first."""
    return [path[len(_PREFIX) :] for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path.startswith(_PREFIX)]


def _inside(node: fx.Node) -> str:
    """The innermost submodule of the model that ``node`` ran in ("" for the model's own forward)."""
    paths = _stack(node)
    return paths[-1] if paths else ""


def _escaping(node: fx.Node, user: fx.Node | None) -> str:
    """The tap name of the module that returns ``node`` to ``user``: the outermost module ``node``
    ran in that ``user`` did not ("" when ``user`` ran inside all of them: an op of that module)."""
    theirs = set(_stack(user)) if user is not None else set()
    for path in _stack(node):
        if path not in theirs:
            return path
    return ""


def _identifier(key: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return text if text and not text[0].isdigit() else f"_{text}"
