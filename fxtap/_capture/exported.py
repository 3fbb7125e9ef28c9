"""The graph of an export-captured ``Tapped`` as a module of the model's own arguments.

``export.ExportRunner`` serves each input signature of a model FX cannot trace from one
``torch.export`` graph, which takes the call's tensors alone. ``TapsProgram`` is the same tapped call with the
model's calling convention: it takes the model's arguments (positional and keyword, the
structure of the call it is exported from), checks that the non-tensor ones have the values
of that call (a graph bakes them in), and returns the ``Tapped``'s dict. ``program`` exports it
(a fresh torch.export of the same call, not the served graph itself: an unlifted
``ExportedProgram.module()`` does not export again) for ``Tapped.graph_module()`` and
``fxtap.export``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._errors import FxtapError
from . import fx as _fx
from .call_spec import adopt_signature
from .export import _WRITES, ExportRunner, _Call, _Entry, _quiet, _tensors
from .masks import eager_shortcuts
from .model import cuda_devices, preserved
from .outputs import Outputs

__all__ = ["TapsProgram", "exported_entry", "graph_module", "program"]


class TapsProgram(nn.Module):
    """The tapped call of a model FX cannot trace, taking the model's own arguments: what
    ``program`` exports (``export._Call`` takes the call's tensors alone)."""

    def __init__(self, runner: ExportRunner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.call = _Call(runner, model, args, kwargs)  # the model (and the edits) as submodules: their tensors, shared
        self._spec = self.call.__dict__["_found"].call[1]
        self._fixed = [None if isinstance(v, torch.Tensor) else v for v in self.call.__dict__["_found"].call[0]]
        self._owner = type(model).__name__

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._spec or any(not isinstance(a, torch.Tensor) and a != b for a, b in zip(leaves, self._fixed)):
            raise FxtapError(
                f"this graph of the taps of {self._owner} takes the arguments of the call it was exported from: "
                f"{_describe(self._spec, self._fixed)}; it got {_describe(spec, leaves)}.\n"
                "  Non-tensor arguments are fixed at the values of that call; for others, export a call with them."
            )
        computed = self.call(*[leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])
        outputs: Outputs = self.call.__dict__["_found"].outputs
        return outputs.rebuild(computed)


def exported_entry(runner: ExportRunner, owner: str) -> _Entry:
    """The graph the last call of ``runner`` ran, or an ``FxtapError`` saying why there is none."""
    entry = runner.last
    if entry is None:
        raise FxtapError(
            f"no torch.export graph of the taps of {owner} yet: torch.fx cannot trace {owner} itself, and fxtap exports "
            "the first call of each input signature.\n  Call the Tapped once with example inputs, then ask again "
            "(the graph takes the arguments of that call; tensor sizes dynamic where torch.export keeps them so)."
        )
    if entry.module is None:
        raise FxtapError(
            f"no single graph computes these taps of {owner}: torch.fx cannot trace {owner} itself, and the last call "
            f"ran in mixed mode ({entry.reason}).\n  See Tapped.report(); tap a traceable submodule instead "
            "(fxtap.tap(model.get_submodule(path), names)), or remove what keeps torch.export out (docs/fallback.md)."
        )
    return entry


def program(runner: ExportRunner, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool) -> Any:
    """The tapped call exported at ``args``/``kwargs`` as a program of the model's arguments:
    every tensor dimension dynamic where torch.export keeps it so (``Dim.AUTO``) when
    ``dynamic``, else static. Run as ``ExportRunner`` runs its export: the RNG, the model's
    attributes and stderr untouched."""
    auto = torch.export.Dim.AUTO

    def dims(leaf: Any) -> Any:
        return dict.fromkeys(range(leaf.dim()), auto) if isinstance(leaf, torch.Tensor) and dynamic and leaf.dim() else None

    module = TapsProgram(runner, model, args, kwargs)
    adopt_signature(module, model)  # inputs named as the model names them (and torch.export's guards work)
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    shapes = {name: pytree.tree_map(dims, list(value) if isinstance(value, tuple) else value) for name, value in bound.items()}
    devices = cuda_devices(_tensors(model, args, kwargs))
    with _fx.exclusive(), torch.random.fork_rng(devices=devices), preserved(model), _quiet(), eager_shortcuts():  # one trace at a time, as the runner's
        exported = torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=shapes, strict=False)
    written = module.call.__dict__["_found"].written
    if written:
        raise FxtapError(f"cannot export the taps of {type(model).__name__}: " + _WRITES.format(written))
    return exported


def graph_module(runner: ExportRunner, model: nn.Module) -> torch.fx.GraphModule:
    """``Tapped.graph_module()`` for an export-captured model: the tapped call exported again at
    the shapes of the last call (ones as values), as ``ExportedProgram.module()``."""
    entry = exported_entry(runner, type(model).__name__)
    if entry.example is None:
        raise AssertionError("expected the example of an exported graph, found none")
    spec, leaves = entry.example
    example = [torch.ones(leaf[0], dtype=leaf[1], device=leaf[2]) if _is_meta(leaf) else leaf for leaf in leaves]
    args, kwargs = pytree.tree_unflatten(example, spec)
    with torch.no_grad():
        return program(runner, model, args, kwargs, dynamic=True).module()  # type: ignore[no-any-return]


def _is_meta(leaf: Any) -> bool:
    return isinstance(leaf, tuple) and len(leaf) == 3 and isinstance(leaf[0], torch.Size)


def _describe(spec: pytree.TreeSpec, leaves: list[Any]) -> str:
    def show(leaf: Any) -> str:
        if isinstance(leaf, torch.Tensor):
            leaf = (leaf.shape, leaf.dtype, leaf.device)
        if _is_meta(leaf):
            return f"tensor{tuple(leaf[0])}"
        return repr(leaf)

    try:
        args, kwargs = pytree.tree_unflatten([show(leaf) for leaf in leaves], spec)
    except Exception:  # noqa: BLE001 - only for the message: another structure than expected
        return f"{len(leaves)} argument leaves"
    return "(" + ", ".join([*map(str, args), *(f"{k}={v}" for k, v in kwargs.items())]) + ")"
