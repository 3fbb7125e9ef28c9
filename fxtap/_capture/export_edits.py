"""Edits on the torch.export frontend: which edits one exported graph may hold, and why not.

A tensor edit (``edit.Patch``) is a buffer of the exported call: the graph reads the live tensor,
so an in-place change is seen; its shape, dtype and device are baked in (``meta``, checked before
a graph serves a call). A module edit is a submodule of the exported call: its parameters are
read and train, its attributes are guarded as the model's. A function edit (``edit.Apply``) may
read Python state a graph would bake in, and no rule tells which: it keeps mixed mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .edit import Apply
from .placement import Placement

__all__ = ["edit_modules", "edit_paths", "edit_refusal", "meta"]


def edit_modules(placement: Placement) -> list[nn.Module]:
    """The edit modules the call runs (in a region's graph or from a hook), each once."""
    found = [*placement.edits.fx.values(), *(module for _, module in placement.edits.hooks.values())]
    return list({id(m): m for m in found}.values())


def edit_refusal(placement: Placement) -> str:
    """Why the edits keep the call in mixed mode ("" when a graph may hold them).

    A tensor edit is a buffer of the graph (it reads the live tensor: an in-place change is
    seen) and a module edit is a submodule (its parameters and buffers are read, its plain
    attributes guarded as the model's are). A function edit may read Python state that a graph
    would bake in (a closure variable, a global, an attribute of an object): no rule tells
    which, so it runs eagerly, every call."""
    functions = [name for name, module in {**placement.edits.fx, **{n: m for n, (_, m) in placement.edits.hooks.items()}}.items() if isinstance(module, Apply)]
    if not functions:
        return ""
    return (
        f"torch.export not used: the function edit(s) {', '.join(map(repr, functions))} may read Python state "
        "(a closure variable, a global) that a graph would bake in; a tensor or nn.Module edit runs in one graph"
    )


def edit_paths(edits: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The modules of the edits, named ``<edit i>.path`` (they are not in the model)."""
    return [(f"<edit {i}>" + (f".{path}" if path else ""), m) for i, edit in enumerate(edits) for path, m in edit.named_modules()]


def meta(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.shape, tensor.dtype, tensor.device)
