"""Checking a written file against the eager graph it was written from."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .._errors import FxtapError, summary

__all__ = ["as_args", "compare", "doubled", "flat", "verify"]


# -- inputs and checks --------------------------------------------------------------------------
def as_args(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


# -- writers ------------------------------------------------------------------------------------------
def flat(out: Mapping[str, Any]) -> dict[str, Any]:
    """``{output name: value}``: a tap's tensor keeps its key; a container's items get ``key.0``, ``key.name``."""
    flat: dict[str, Any] = {}

    def visit(name: str, value: Any) -> None:
        if isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                visit(f"{name}.{index}", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}", item)
        else:
            flat[name] = value

    for key, value in out.items():
        visit(key, value)
    return flat


def doubled(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The inputs at twice the batch size (the rows again, reversed)."""
    return tuple(torch.cat([a, a.flip(0)]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


# -- verification ---------------------------------------------------------------------------------------
def verify(fmt: str, graph: fx.GraphModule, path: Path, args: tuple[Any, ...], dynamic_batch: bool, *, atol: float, rtol: float) -> None:
    """Load the written file and compare it with the graph at the example batch (and at twice it when the batch is dynamic)."""
    run = _loader(fmt, path)
    for inputs in [args, doubled(args)] if dynamic_batch or fmt == "torchscript" else [args]:
        with torch.no_grad():
            expected = {k: v for k, v in flat(graph(*inputs)).items() if isinstance(v, torch.Tensor)}
            try:
                actual = run(inputs)
            except Exception as error:  # any runtime's failure is a failed check
                raise FxtapError(
                    f"the {fmt} file {path.name!r} fails on inputs of shape {_shapes(inputs)}: {summary(error)}"
                ) from error
        compare(fmt, path, expected, actual, _shapes(inputs), atol=atol, rtol=rtol)


def _loader(fmt: str, path: Path) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    if fmt == "pt2":
        program = torch.export.load(path).module()
        return lambda inputs: flat(program(*inputs))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            scripted = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
        return lambda inputs: flat(scripted(*inputs))
    import onnxruntime  # type: ignore[import-untyped]  # lazily: only ONNX export needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(inputs: tuple[Any, ...]) -> dict[str, Any]:
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        results = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)})
        return {name: torch.from_numpy(array) for name, array in zip(outputs, results)}

    return run


def compare(fmt: str, path: Path, expected: dict[str, Any], actual: dict[str, Any], shapes: str, *, atol: float, rtol: float) -> None:
    """An ``FxtapError`` unless the file's outputs (``actual``) match eager's, name by name,
    on the inputs of ``shapes``."""
    got = {k: v for k, v in actual.items() if isinstance(v, torch.Tensor)}
    if list(got) != list(expected):
        raise FxtapError(f"the {fmt} file {path.name!r} returns outputs named {list(got)}, expected the tap keys {list(expected)}")
    problems = []
    for key, want in expected.items():
        have = got[key].to(want.device)
        if have.shape != want.shape:
            problems.append(f"{key!r}: shape {tuple(have.shape)}, expected {tuple(want.shape)}")
        elif not _close(have, want, atol=atol, rtol=rtol):
            diff = (have.double() - want.double()).abs().max().item()
            problems.append(f"{key!r}: max abs diff {diff:.3g} (largest |eager| {want.double().abs().max().item():.3g})")
    if problems:
        raise FxtapError(
            f"the {fmt} file {path.name!r} differs from eager on inputs of shape {shapes} "
            f"(atol={atol}, rtol={rtol}): {'; '.join(problems)}"
        )


def _close(have: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float) -> bool:
    """``|have - want| <= atol + rtol * max|want|`` elementwise (NaN where both are NaN).

    The relative part scales with the tensor's largest value, not each element's: the rounding
    of a float32 sum depends on the size of its terms, and a small element of a tensor with
    large ones carries the rounding error of the large ones.
    """
    have, want = have.double(), want.double()
    if not want.numel():
        return True
    both_nan = have.isnan() & want.isnan()
    scale = want.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max()
    ok = (have - want).abs() <= atol + rtol * scale
    return bool((ok | both_nan | (have == want)).all())


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in inputs)
