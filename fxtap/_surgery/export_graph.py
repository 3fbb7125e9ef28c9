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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .._capture.outputs import _CONSTANTS, Outputs, _Slot
from .._errors import CutError
from .export_shapes import Shapes, bound, dim
from .export_walk import (
    PREFIX,
    Walk,
    ancestors,
    descendants,
    random,
    state_writes,
    upstream_of,
)

__all__ = ["Built", "Unnamed", "cut_graph"]


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
    program: Any, call: nn.Module, model: nn.Module, inputs: dict[str, str], outputs: dict[str, str], model_names: list[str],
    is_tensor: Callable[[str], bool], named: Sequence[str] = (),
) -> Built:
    """The cut's ``GraphModule`` from ``program`` (``run_decompositions``'d export of ``call``);
    ``is_tensor`` tells whether a tap name's value is one tensor (to name missing values by a
    module that returns them alone); ``named``: tap names the call also returns, after the
    outputs, to name values that ops compute."""
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
    unused = [name for name, node in zip(inputs, given) if not any(p.args[1] is node for p in points)]
    if unused:
        raise CutError(
            f"cannot cut {owner} at {', '.join(map(repr, unused))}: the model's call at the example does not compute "
            f"{'it' if len(unused) == 1 else 'them'} (the code that does is not run), so the cut would ignore the value given.\n"
            "  Cut at values the call computes: fxtap.names(model, example) lists them."
        )
    last = max((order[p] for p in points), default=-1)
    replaced = [p.args[0] for p in points]
    for point in points:
        point.replace_all_uses_with(point.args[1])
    derived = descendants(graph, set(given))
    upstream = upstream_of(graph, set(model_inputs), replaced)
    before = upstream.union(*(ancestors(r) | {r} for r in replaced if isinstance(r, fx.Node)))  # a tensor edit reads no values
    _check_edits(graph, before, call.__dict__.get("edit_names", {}), owner, inputs)

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
    randoms = [n for n in graph.nodes if (order.get(n, -1) > last or n in derived) and random(n) and not (ancestors(n) & upstream)]
    walk = Walk(graph, upstream, set(model_inputs), given, owner, names_of, is_tensor)
    walk.run([v for v in user_out if isinstance(v, fx.Node)] + randoms)
    kept_writes = state_writes(writes, derived, descendants(graph, set(model_inputs)), order, last, walk.needed)
    walk.run([v for _, _, v in kept_writes])
    stale = [target.removeprefix(PREFIX) for kind, target, value in writes if value in walk.needed and (kind, target, value) not in kept_writes]
    if stale:  # the cut would compute the update but not keep it: each call would read the same value
        raise CutError(
            f"cannot cut {owner} at {', '.join(map(repr, inputs))}: the outputs read the state {', '.join(map(repr, stale))} as the "
            "model updates it before the cut, which the cut does not run.\n  Cut before that update; see docs/cut.md."
        )
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


def _check_edits(graph: fx.Graph, upstream: set[fx.Node], names: dict[int, str], owner: str, inputs: dict[str, str]) -> None:
    """Refuse edits of values computed before the cut: the cut never runs them (as on FX)."""
    early: dict[str, None] = {}
    for node in graph.nodes:
        if node in upstream and node.target is not torch.ops.fxtap.cut_point.default:  # a cut input's own replacement is not early
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                parts = str(path).split(".")
                if len(parts) >= 2 and parts[0] == "edits" and parts[1].isdigit() and int(parts[1]) in names:
                    early[names[int(parts[1])]] = None
    if early:
        listed = ", ".join(map(repr, early))
        raise CutError(
            f"cannot edit {listed} in a cut of {owner} at {', '.join(map(repr, inputs))}: "
            f"{'it is' if len(early) == 1 else 'they are'} computed before the cut, which the cut never runs.\n"
            f"  Edit while taking the cut inputs instead: fxtap.tap(model, {list(inputs)!r}, edit={{{listed}: ...}}) "
            "returns them as computed after the edit; see docs/cut.md."
        )


def _assemble(
    program: Any, call: nn.Module, graph: fx.Graph, given: list[fx.Node], keys: list[str], model_inputs: list[fx.Node], names: dict[fx.Node, str],
    walk: Walk, results: tuple[list[tuple[Outputs, int]], list[list[Any]]], outputs: dict[str, str], writes: list[tuple[str, str, fx.Node]], owner: str,
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
            source, axis = replacement
            env[node] = new.call_function(torch.ops.aten.sym_size.int, (env[source], axis))
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
    new.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or random(n))
    module = fx.GraphModule(root, new, class_name=f"Cut{owner}")
    module.meta["fxtap_input_names"] = list(argument_names)
    dims = [(name, [dim(s) for s in node.meta["val"].shape]) for name, node in zip(argument_names, arguments)]
    ranges = {symbol: (bound(r.lower, 0), bound(r.upper, None)) for symbol, r in program.range_constraints.items() if isinstance(symbol, sympy.Symbol)}
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


def _identifier(key: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return text if text and not text[0].isdigit() else f"_{text}"
