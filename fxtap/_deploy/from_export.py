"""``export`` for a model only the torch.export frontend captures (a Hugging Face model).

Such a model has no FX graph: its ``Tapped`` runs the first call of each input signature in
mixed mode and then exports that call (``_capture.export``). Here the same tapped call is
exported with the model's own arguments (``_capture.exported.program``: positional and keyword,
non-tensor arguments fixed at the example's values), written as pt2 or ONNX, loaded back with
the runtime that serves it, and checked against mixed mode (the eager truth) at the example,
at twice its batch (``dynamic_batch``), and at twice every other size torch.export kept
dynamic (a text model's sequence length), within that size's range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._capture.export import ExportRunner
from .._capture.exported import exported_entry, program
from .._errors import FxtapError, summary
from .._tap import Tapped
from .verify import compare, flat

__all__ = ["as_call", "write_exported"]

_ONNX_SINGLE_FILE_BYTES = 1 << 30


def as_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example as positional and keyword arguments: a tensor, a tuple of positional
    arguments, or a mapping of keyword arguments."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    return (example_input if isinstance(example_input, tuple) else (example_input,)), {}


def write_exported(
    tapped: Tapped, fmt: str, path: Path, call: tuple[tuple[Any, ...], dict[str, Any]], dynamic_batch: bool, *,
    atol: float, rtol: float, refused: Callable[[str], None],
) -> None:  # fmt: skip
    """Write the taps of ``tapped`` (export-captured) to ``path`` and check the file; the caller
    removes a file that fails. ``refused(reason)`` raises the error for a call torch.export
    could not capture (``reason`` says why)."""
    owner = type(tapped.model).__name__
    if fmt == "torchscript":
        raise FxtapError(
            f"cannot write the taps of {owner} as TorchScript: torch.fx cannot trace {owner} itself, and the graph "
            "torch.export gives has no TorchScript form.\n  Export to pt2 (path ending in .pt2) or ONNX (.onnx) instead."
        )
    args, kwargs = call
    traced = _doubled(args, kwargs, {0}) if dynamic_batch else call  # torch.export specializes a size of 1
    with torch.no_grad():
        tapped(*traced[0], **traced[1])  # the first call of this signature: mixed mode, then the export
    runner = tapped._last_runner()
    if not isinstance(runner, ExportRunner):
        raise AssertionError(f"expected the torch.export frontend, got {type(runner).__name__}")  # noqa: TRY004 - an invariant
    if runner.last is None or runner.last.module is None:
        refused(runner.last.reason if runner.last is not None else "")
    exported_entry(runner, owner)
    try:
        with torch.no_grad():
            written = program(runner, tapped.model, *traced, dynamic=dynamic_batch)
            names = _tensor_outputs(runner.eager(tapped.model, *traced))
            if fmt == "pt2":
                torch.export.save(written, path)
            else:
                size = sum(t.numel() * t.element_size() for t in [*written.parameters(), *written.buffers()])
                torch.onnx.export(written, f=str(path), output_names=names, external_data=size > _ONNX_SINGLE_FILE_BYTES, verbose=False)
    except FxtapError:
        raise
    except Exception as error:  # each exporter fails with its own exception types
        hint = " If the model fixes its batch size, pass dynamic_batch=False." if dynamic_batch else ""
        raise FxtapError(f"{fmt} export of the taps of {owner} failed: {summary(error)}{hint}") from error
    kwargs = _ordered(written, kwargs)  # as torch.export orders them: tensor inputs are matched by position
    run = _loader(fmt, path, written)
    for inputs in _checks(written, args, kwargs, dynamic_batch):
        with torch.no_grad():
            expected = {k: v for k, v in flat(runner.eager(tapped.model, *inputs)).items() if isinstance(v, torch.Tensor)}
            try:
                actual = run(inputs)
            except Exception as error:  # any runtime's failure is a failed check
                raise FxtapError(f"the {fmt} file {path.name!r} fails on inputs of shape {_shapes(inputs)}: {summary(error)}") from error
        compare(fmt, path, expected, actual, _shapes(inputs), atol=atol, rtol=rtol)


def _tensor_outputs(out: Mapping[str, Any]) -> list[str]:
    return [name for name, value in flat(out).items() if isinstance(value, torch.Tensor)]


def _doubled(args: tuple[Any, ...], kwargs: dict[str, Any], dims: set[int] | dict[int, set[int]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with the sizes at ``dims`` doubled (the entries again, reversed): the same
    dims of every tensor (a set), or per tensor leaf (its index -> dims)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = 0
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        for dim in sorted(dims if isinstance(dims, set) else dims.get(tensors, set())):
            if dim < leaf.dim():
                leaf = torch.cat([leaf, leaf.flip(dim)], dim)
        leaves[i] = leaf
        tensors += 1
    return pytree.tree_unflatten(leaves, spec)  # type: ignore[no-any-return]


def _checks(written: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs the file is checked on: the example; twice its batch; twice every other size
    the program keeps dynamic (all at once), where that size's range allows it."""
    checks = [(args, kwargs)]
    if dynamic_batch:
        checks.append(_doubled(args, kwargs, {0}))
    longer = _dynamic_dims(written, args, kwargs)
    if longer:
        checks.append(_doubled(args, kwargs, longer))
    return checks


def _dynamic_dims(written: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, set[int]]:
    """Per tensor input (in order), its dims after the first that the program keeps dynamic
    and that may double; empty when the inputs cannot be matched with the program's."""
    users = set(written.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in written.graph.nodes if n.op == "placeholder" and n.name in users]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    given = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    if len(tensors) != len(given):
        return {}
    ranges = written.range_constraints
    found: dict[int, set[int]] = {}
    for index, (value, leaf) in enumerate(zip(tensors, given)):
        for dim, size in enumerate(value.shape):
            if dim == 0 or not isinstance(size, torch.SymInt):
                continue
            bound = ranges.get(size.node.expr)
            if bound is not None and 2 * leaf.shape[dim] <= bound.upper:
                found.setdefault(index, set()).add(dim)
    return found


def _loader(fmt: str, path: Path, written: Any) -> Callable[[tuple[tuple[Any, ...], dict[str, Any]]], dict[str, Any]]:
    if fmt == "pt2":
        loaded = torch.export.load(path).module()
        return lambda call: flat(loaded(*call[0], **call[1]))
    import onnxruntime  # type: ignore[import-untyped]  # lazily: only ONNX export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    names = [i.name for i in session.get_inputs()]

    def run(call: tuple[tuple[Any, ...], dict[str, Any]]) -> dict[str, Any]:
        tensors = [leaf for leaf in pytree.tree_leaves(call) if isinstance(leaf, torch.Tensor)]
        results = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)})
        return {name: torch.from_numpy(array) for name, array in zip(outputs, results)}

    return run


def _ordered(written: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` in the order of the program's inputs (torch.export orders them by the signature)."""
    order = list(written.call_spec.in_spec.child(1).context)
    return {key: kwargs[key] for key in sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))}


def _shapes(call: tuple[tuple[Any, ...], dict[str, Any]]) -> str:
    leaves = pytree.tree_leaves(call)
    return ", ".join(str(tuple(a.shape)) for a in leaves if isinstance(a, torch.Tensor))
