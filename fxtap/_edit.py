"""``edit()``: the model with named values replaced, and ``Edited``, the module it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import fx, nn

from ._capture.edit import Apply, Patch, as_modules
from ._capture.model import unwrap
from ._tap import Mode, Tapped

__all__ = ["Edit", "Edited", "edit"]

Edit = Union[Callable[[Any], Any], torch.Tensor, nn.Module]
_MODES = ("auto", "fx", "hooks")


def edit(model: nn.Module, edits: Mapping[str, Edit], *, mode: Mode = "auto") -> Edited:
    """Wrap ``model`` so that calling it returns the model's own output computed with named values replaced.

    Each edit replaces one value, named as for ``fxtap.tap`` (any name ``fxtap.names(model)``
    lists), right where the model produces it: every later use of the value sees the
    replacement, as if the model's code had the edit written in that line.

    Args:
        model: any ``nn.Module``. It is not changed: no hooks are left on it, its modules and
            parameters are shared, not copied.
        edits: tap name -> the edit, one of:
            a callable ``fn(value) -> replacement`` (same structure as the value);
            a tensor, which replaces the value (activation patching), broadcast as in
            ``torch.where``; a later in-place op of the model never writes into it;
            an ``nn.Module`` called on the value, which becomes a submodule of the ``Edited``
            (its parameters are in ``edited.parameters()`` and train).
        mode: ``"fx"`` edits inside the traced graph and never falls back; ``"hooks"`` edits
            module outputs with forward hooks only; ``"auto"`` uses the graph and hooks only for
            module outputs inside untraceable code.

    Returns:
        An ``Edited`` module; calling it with the model's inputs returns the model's output.

    Raises:
        TapNameError: a name does not exist, or cannot be edited (a functional op inside
            untraceable code: the message names the nearest module whose output can be).
        TypeError: an edit is not a callable, a tensor or a module.
        ValueError: ``edits`` is empty, or ``mode`` is unknown.

    Example:
        >>> import torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> ablated = fxtap.edit(model, {"layer3.1.add": torch.zeros_like})
        >>> ablated(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
        >>> ablated.paths
        {'layer3.1.add': 'fx'}
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
    if not edits:
        raise ValueError("edits is empty: pass {tap name: function, tensor or module}")
    return Edited(unwrap(model), {}, mode=mode, detach=False, keep_output=True, edits=as_modules(edits))


class Edited(Tapped):
    """A model with named values replaced; built by ``fxtap.edit``.

    ``Edited(*args, **kwargs)`` passes every input to the model and returns its output. The
    wrapped model is ``.model`` (shared, not copied); the edit modules are ``.edits``.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)["output"]

    @property
    def mode(self) -> str:
        """How the edits are applied in the current train/eval mode: ``"fx"`` (one graph holds the
        model and every edit), ``"export"`` (one ``torch.export`` graph of a model FX cannot trace
        holds them, from the second call of an input signature on), ``"hooks"`` (forward hooks on
        an eagerly running model) or ``"mixed"``."""
        if self._last_runner().mode == "export":
            return "export"
        placement = self._placement()
        if not placement.eager_root and not placement.edits.hooks:
            return "fx"
        return "mixed" if placement.edits.fx or not placement.eager_root else "hooks"

    @property
    def paths(self) -> dict[str, str]:
        """Each edited name mapped to ``"fx"`` (in a graph), ``"hook"`` (a forward hook) or
        ``"export"`` (in the one ``torch.export`` graph of a model FX cannot trace)."""
        placed = self._placement().edits
        exported = self._last_runner().mode == "export"
        return {name: "export" if exported else placed.path(name) for name in self._edits}

    def report(self) -> str:
        """A table: one row per edit with its kind, path, module type and fallback reason."""
        from ._text import table

        placed, paths = self._placement().edits, self.paths
        note = getattr(self._last_runner(), "note", "")  # the export frontend: its graph, or why none
        rows = [
            [name, _kind(module), paths[name], placed.module_types.get(name, ""), "; ".join(filter(None, [placed.reasons.get(name, ""), note]))]
            for name, module in self._edits.items()
        ]
        return table(["name", "edit", "path", "module type", "reason"], rows)

    def graph_module(self) -> fx.GraphModule:
        """The ``torch.fx.GraphModule`` of the edited model (non-tensor arguments at their
        defaults), returning ``{"output": ...}``: the form to hand to ``torch.export`` or ONNX.
        For a model only the torch.export frontend captures, the last call's graph (see
        ``Tapped.graph_module``).

        Raises:
            FxtapError: some edits are applied by hooks, which no graph can hold; or (export
                frontend) no call yet, or a function edit kept the call in mixed mode.
        """
        return super().graph_module()


def _kind(module: nn.Module) -> str:
    if isinstance(module, Patch):
        return f"tensor {tuple(module.tensor.shape)}"
    if isinstance(module, Apply):
        return "function"
    return type(module).__name__
