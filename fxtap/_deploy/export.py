"""``export``: the taps of a model written as ONNX, pt2 or TorchScript, and checked.

``export`` writes the pruned FX graph of a ``Tapped`` (``Tapped.graph_module()``), loads the
written file back with the runtime that will serve it, and checks it against the eager graph
at the example batch size and, for a dynamic batch, at twice that size. TorchScript
cannot save fxtap's Python helpers ``copy_value`` and ``assert_is_none``, so it gets a
copy of the graph in which copies are plain ``clone`` calls and the guards are gone.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn

from .._capture import Placement
from .._capture.export import ExportRunner
from .._errors import (
    FxtapError,
    summary,
)
from .._surgery.cut import Cut
from .._tap import Tapped, _tapped
from .._values import assert_is_none, copy_value
from .from_export import as_call, write_exported
from .verify import as_args as _as_args
from .verify import doubled as _doubled
from .verify import flat as _flat
from .verify import verify as _verify

__all__ = ["ExportFormat", "export"]

ExportFormat = Literal["onnx", "pt2", "torchscript"]
_FORMATS: tuple[str, ...] = ("onnx", "pt2", "torchscript")
_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".pt": "torchscript", ".ts": "torchscript"}
_ONNX_SINGLE_FILE_BYTES = 1 << 30  # above this, weights go to a ``<path>.data`` file (ONNX's protobuf limit is 2 GiB)


def export(
    model: nn.Module,
    names: Mapping[str, str] | Sequence[str] | None,
    example_input: Any,
    path: str | Path,
    *,
    format: ExportFormat | None = None,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    edit: Mapping[str, Any] | None = None,
) -> Path:
    """Write the taps of ``model`` as one deployable graph, and check the file against eager.

    Only the computation the taps need is written. ONNX outputs are named by the output keys
    (``key.0``, ``key.1``, ... for the tensors of a tap that returns a tuple).

    Args:
        model: an ``nn.Module`` in eval mode whose requested names torch.fx can capture, or one
            only the torch.export frontend captures (a Hugging Face model: the file is the
            tapped call exported with the model's own arguments; docs/export.md).
        names: tap names, or ``{name: output key}``, as for ``fxtap.tap``; ``None`` when ``model``
            is a ``fxtap.Cut``, which writes the cut's graph (inputs named by its keys).
        example_input: one input tensor, or a tuple of the model's positional tensor arguments.
            Later arguments of ``forward`` are fixed at their defaults. For a model torch.export
            captures, also a dict of keyword arguments (``{"input_ids": ..., "attention_mask":
            ...}``); its non-tensor arguments are fixed at their example values.
        path: where to write; parent folders must exist.
        format: ``"onnx"``, ``"pt2"`` (``torch.export``) or ``"torchscript"``; by default from
            the suffix of ``path`` (``.onnx``, ``.pt2``, ``.pt`` or ``.ts``).
        dynamic_batch: let dim 0 of every input vary (TorchScript always does); for a model
            torch.export captures, every size torch.export can keep dynamic (``False``: none).
        atol: absolute tolerance: each output ``a`` of the written file must match eager's ``e``
            within ``|a - e| <= atol + rtol * max|e|`` (the largest value of that output).
        rtol: relative tolerance (other runtimes' float32 kernels add in another order; the
            rounding error grows with the size of the values summed).
        edit: values replaced in the written graph, as for ``fxtap.edit``; every edit must be
            on the FX path (TorchScript cannot script a Python function edit: use pt2 or ONNX).

    Returns:
        ``path`` as a ``Path``, once the written file was loaded and matched eager.

    Raises:
        FxtapError: a name is captured by forward hooks (the message names the untraceable
            submodule), an exporter failed, or the written file does not match eager (the file
            is then removed). For a model torch.export captures: TorchScript was asked for, or
            torch.export could not record the call (the message gives its reason).
        ValueError: the format is unknown, or the model is in train mode.
        TypeError: a dict of keyword arguments for a model torch.fx traces (pass a tuple).

    Example:
        >>> import tempfile, torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> folder = tempfile.mkdtemp()
        >>> fxtap.export(model, {"layer2": "c3"}, torch.randn(1, 3, 64, 64), f"{folder}/c3.pt2").name
        'c3.pt2'
    """
    path = Path(path)
    fmt = _format(path, format)
    if model.training:
        raise ValueError(
            f"export needs {type(model).__name__} in eval mode (train-mode layers change state and differ per run): call model.eval() first"
        )
    if names is None and not isinstance(model, Cut):
        raise ValueError("names is None: pass the tap names to export (None is for a fxtap.Cut, which knows its outputs)")
    tapped = None if isinstance(model, Cut) else _tapped(model, names or [], mode="auto", warn=False, edit=edit)  # export raises instead
    if tapped is not None and isinstance(tapped._last_runner(), ExportRunner):  # no FX graph: the torch.export frontend's
        hf = tapped
        call = as_call(example_input)

        def refused(reason: str) -> None:  # raises the FX path's error, naming the untraceable code, with the reason
            _fx_graph(hf, edit, reason)

        return _write_checked(path, lambda: write_exported(hf, fmt, path, call, dynamic_batch, atol=atol, rtol=rtol, refused=refused))
    if isinstance(example_input, Mapping):
        raise TypeError(
            f"example_input is a mapping (keyword arguments), which only models captured by torch.export take; {type(model).__name__} "
            "is traced by torch.fx: pass one tensor or a tuple of its positional tensor arguments"
        )
    args = _as_args(example_input)
    graph = _fx_graph(tapped, edit) if tapped is not None else model.graph_module()  # type: ignore[operator]
    with torch.no_grad():
        outputs = dict(graph(*args))
    writer = {"onnx": _write_onnx, "pt2": _write_pt2, "torchscript": _write_torchscript}[fmt]

    def write() -> None:
        try:
            writer(graph, args, path, dynamic_batch, outputs)
        except FxtapError:
            raise
        except Exception as error:  # each exporter fails with its own exception types
            hint = " If the model fixes its batch size, pass dynamic_batch=False." if dynamic_batch and fmt != "torchscript" else ""
            raise FxtapError(
                f"{fmt} export of the taps of {type(model).__name__} failed: {summary(error)}{hint}"
            ) from error
        _verify(fmt, graph, path, args, dynamic_batch, atol=atol, rtol=rtol)

    return _write_checked(path, write)


def _write_checked(path: Path, write: Callable[[], None]) -> Path:
    """``write()`` the file and check it; a file that did not pass is removed."""
    before = _stamps(path)
    try:
        write()
    except FxtapError:
        _remove_written(path, before)  # never leave a file that did not pass the check
        raise
    return path


def _format(path: Path, format: str | None) -> str:
    if format is None:
        found = _SUFFIXES.get(path.suffix.lower())
        if found is None:
            raise ValueError(
                f"cannot tell the export format from {path.name!r}: pass format= one of {', '.join(map(repr, _FORMATS))}, "
                f"or use a suffix among {', '.join(_SUFFIXES)}"
            )
        return found
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, _FORMATS))}, not {format!r}")
    return format


def _files(path: Path) -> tuple[Path, Path]:
    return path, path.with_name(path.name + ".data")  # ONNX may put the weights in <path>.data


def _stamps(path: Path) -> list[tuple[int, int, int] | None]:
    return [(st.st_ino, st.st_size, st.st_mtime_ns) if f.exists() and (st := f.stat()) else None for f in _files(path)]


def _remove_written(path: Path, before: list[tuple[int, int, int] | None]) -> None:
    """Remove the files this call wrote (a file that was there before and is untouched stays)."""
    for file, stamp, old in zip(_files(path), _stamps(path), before):
        if stamp is not None and stamp != old:
            file.unlink()


def _fx_graph(tapped: Tapped, edit: Mapping[str, Any] | None = None, export_failed: str = "") -> fx.GraphModule:
    """The pruned graph of the taps, or an ``FxtapError`` naming the code that keeps them out of one graph
    (and ``export_failed``: why the torch.export frontend could not capture them either)."""
    try:
        return _fx_graph_or_error(tapped, edit)
    except FxtapError as error:
        if not export_failed:
            raise
        raise FxtapError(f"{error}\n  torch.export could not capture the call either: {export_failed}") from None


def _fx_graph_or_error(tapped: Tapped, edit: Mapping[str, Any] | None = None) -> fx.GraphModule:
    model = tapped.model
    placement = tapped._placement(tapped._spec)
    if placement.edits.hooks and not placement.hooks:
        return tapped.graph_module()  # raises, naming the edits that hooks apply
    owner = type(model).__name__
    if placement.eager_root and not placement.hooks:  # an untraceable root whose children fxtap traces one call at a time
        raise FxtapError(
            f"cannot export the taps of {owner}: torch.fx cannot trace the forward of {owner} itself: "
            f"{placement.fallbacks[''][1]}, so no single graph computes them.\n"
            "  Export the submodule that holds them instead (fxtap.export(model.<child>, ...)), or make the forward traceable (docs/fallback.md)."
        )
    if not placement.hooks:
        return tapped.graph_module()  # opaque leaves without requested names run inside the written graph
    hooked = list(placement.hooks)
    reasons = "\n  ".join(_why_hooked(model, placement, name) for name in hooked)
    raise FxtapError(
        f"cannot export {', '.join(map(repr, hooked))} of {owner}: forward hooks capture "
        f"{'it' if len(hooked) == 1 else 'them'}, and hooks cannot be exported.\n  {reasons}\n"
        "  Tap that submodule's own output or names outside it instead, or make its code traceable (docs/fallback.md)."
    )


def _why_hooked(model: nn.Module, placement: Placement, name: str) -> str:
    """The submodule the graph runs as one step around a hooked name, and why."""
    leaf = placement.leaves.get(name, "")
    kind = type(model.get_submodule(leaf)).__name__
    if not leaf:
        return f"{name!r}: torch.fx cannot trace the forward of {kind} itself: {placement.fallbacks[''][1]}"
    if leaf in placement.fallbacks:
        return f"{name!r} is inside submodule {leaf!r} ({kind}), which torch.fx cannot trace: {placement.fallbacks[leaf][1]}"
    return f"{name!r} is inside submodule {leaf!r} ({kind}), which torch.fx runs as one step without entering it"


def _exported(graph: fx.GraphModule, args: tuple[Any, ...], dynamic_batch: bool) -> torch.export.ExportedProgram:
    if not dynamic_batch:
        return torch.export.export(graph, args)
    # torch.export specialises a dim of size 1, so a dynamic batch is traced at twice the example's batch.
    try:
        return torch.export.export(graph, _doubled(args), dynamic_shapes=_batch_shapes(args, torch.export.Dim("batch")))
    except Exception as error:  # noqa: BLE001 - only torch.export's own suggestion of a bounded batch is taken
        bounds = _BOUNDED_BATCH.search(str(error))
        if bounds is None:
            raise
    # the code bounds the batch (cuDNN's convolutions on CUDA: at most 65535): dynamic within those bounds
    low, high = bounds.groups()
    batch = torch.export.Dim("batch", **({"min": int(low)} if low else {}), **({"max": int(high)} if high else {}))
    return torch.export.export(graph, _doubled(args), dynamic_shapes=_batch_shapes(args, batch))


def _batch_shapes(args: tuple[Any, ...], batch: Any) -> tuple[Any, ...]:
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


# torch.export's suggested fix when the traced code guards the batch's size with bounds
_BOUNDED_BATCH = re.compile(r"^\s*batch = Dim\('batch'(?:, min=(\d+))?(?:, max=(\d+))?\)\s*$", re.MULTILINE)


def _write_pt2(graph: fx.GraphModule, args: tuple[Any, ...], path: Path, dynamic_batch: bool, outputs: dict[str, Any]) -> None:
    torch.export.save(_exported(graph, args, dynamic_batch), path)


def _write_onnx(graph: fx.GraphModule, args: tuple[Any, ...], path: Path, dynamic_batch: bool, outputs: dict[str, Any]) -> None:
    inputs = graph.meta.get("fxtap_input_names") or [n.name for n in graph.graph.nodes if n.op == "placeholder"]
    inputs = inputs[: len(args)]
    tensors = [name for name, value in _flat(outputs).items() if isinstance(value, torch.Tensor)]
    size = sum(t.numel() * t.element_size() for t in [*graph.parameters(), *graph.buffers()])
    torch.onnx.export(
        _exported(graph, args, dynamic_batch),
        f=str(path),
        input_names=[name for name, a in zip(inputs, args) if isinstance(a, torch.Tensor)],
        output_names=tensors,
        external_data=size > _ONNX_SINGLE_FILE_BYTES,
        verbose=False,
    )


def _write_torchscript(graph: fx.GraphModule, args: tuple[Any, ...], path: Path, dynamic_batch: bool, outputs: dict[str, Any]) -> None:
    others = {key: type(value).__name__ for key, value in outputs.items() if not isinstance(value, torch.Tensor)}
    if others:
        detail = ", ".join(f"{key!r} is a {kind}" for key, kind in others.items())
        raise FxtapError(
            f"TorchScript export returns Dict[str, Tensor], so every tap must be one tensor: {detail}. "
            "Tap the tensors inside instead, or export to pt2 or onnx."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support instance-level annotations")
        torch.jit.save(torch.jit.script(_scriptable(graph, len(args))), str(path))


def _scriptable(graph: fx.GraphModule, n_args: int) -> fx.GraphModule:
    """A copy TorchScript compiles: ``copy_value`` becomes ``clone``, FX's None-guards go,
    arguments after the first ``n_args`` become their defaults, and no node keeps a type annotation
    (FX writes string annotations under ``from __future__ import annotations`` as unknown names)."""
    new = fx.Graph()
    new.output(new.graph_copy(graph.graph, {}))
    placeholders = [n for n in new.nodes if n.op == "placeholder"]
    for node in placeholders[n_args:]:
        _replace_with_constant(node, node.args[0] if node.args else None)
    for node in list(new.nodes):
        node.type = None
        if node.op == "call_function" and node.target in (assert_is_none, torch.fx._symbolic_trace._assert_is_none):
            new.erase_node(node)
        elif node.op == "call_function" and node.target is copy_value:
            with new.inserting_after(node):
                clone = new.call_method("clone", node.args)
            node.replace_all_uses_with(clone)
            new.erase_node(node)
    for node in placeholders[n_args:]:
        new.erase_node(node)
    new.lint()
    return fx.GraphModule(graph, new, class_name=type(graph).__name__)


def _replace_with_constant(node: fx.Node, value: Any) -> None:
    def swap(n: fx.Node) -> Any:
        return value if n is node else n

    for user in list(node.users):
        user.args = tuple(fx.node.map_arg(user.args, swap))
        user.kwargs = dict(fx.node.map_arg(user.kwargs, swap))
