"""Runtime helpers on tapped values: copy and detach tensors inside any container.

They are called from generated graph code (by qualified name, so a pickled ``GraphModule``
finds them again) and from the hook path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["copy_value", "detach_value", "holds_tensor", "map_tensors"]


def copy_value(value: Any) -> Any:
    """A snapshot of ``value``: tensors cloned (autograd still flows), containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return map_tensors(value, torch.Tensor.clone)


def detach_value(value: Any) -> Any:
    """``value`` with every tensor detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return map_tensors(value, torch.Tensor.detach)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists, dicts (and their subclasses)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps dict subclasses such as OrderedDict or ModelOutput
        for key, item in value.items():
            out[key] = map_tensors(item, fn)
        return out
    return value


def holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a pytree container with a tensor inside (tuples, lists,
    dicts, namedtuples and registered types such as ``ModelOutput``): such an argument is a graph
    input, any other is fixed at its value."""
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
