"""Runtime helpers on tapped values: copy and detach tensors inside any container.

They are called from generated graph code (by qualified name, so a pickled ``GraphModule``
finds them again) and from the hook path.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Frozen", "as_call", "assert_is_none", "copy_value", "detach_value", "frozen", "holds_tensor", "map_tensors", "thawed"]


class Frozen:
    """An unhashable non-tensor argument (a list, a dict) as part of a hashable key.

    Graphs are cached per value of the non-tensor arguments; a list default or a list passed in
    a call must key that cache by its contents and still reach tracing as the list itself (not
    its ``repr``). Equal contents of equal types are equal keys.
    """

    __slots__ = ("_key", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._key = _structure(value)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frozen) and self._key == other._key

    def __repr__(self) -> str:
        return repr(self.value)


def _structure(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((_structure(k), _structure(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(_structure(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return (type(value), id(value))  # no structure known: the object itself
    return (type(value), value)  # 1, 1.0 and True trace alike but are different values


def frozen(value: Any) -> Any:
    """``value`` if it is hashable, else a ``Frozen`` holding it."""
    try:
        hash(value)
    except TypeError:
        return Frozen(value)
    return value


def thawed(value: Any) -> Any:
    """The value a ``frozen`` one holds."""
    return value.value if isinstance(value, Frozen) else value


# ``torch.jit.ignore``: ``torch.jit.script(tapped.graph_module())`` calls these back in Python
# instead of compiling their bodies (``fxtap.export`` writes a copy as ``clone()`` for files).
@torch.jit.ignore  # type: ignore[misc]
def copy_value(value: Any) -> Any:
    """A snapshot of ``value``: tensors cloned (autograd still flows), containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return map_tensors(value, torch.Tensor.clone)


@torch.jit.ignore  # type: ignore[misc]
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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init})
    return value


@torch.jit.ignore  # type: ignore[misc]
def assert_is_none(value: Any, msg: str) -> None:
    """FX's guard on an argument fixed at ``None`` (``torch.fx._symbolic_trace._assert_is_none``),
    which TorchScript cannot compile (its ``value: object``): graphs call this one instead."""
    if value is not None:
        raise AssertionError(msg)


for _helper in (copy_value, detach_value):
    _helper.__annotations__ = {"value": Any, "return": Any}  # objects, not strings: TorchScript reads them
assert_is_none.__annotations__ = {"value": Any, "msg": str, "return": None}


def as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A model's inputs as one argument: a dict of keyword arguments (``model(**inputs)``), a tuple
    or list of positional ones (``model(*inputs)``), or anything else, one positional argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a pytree container with a tensor inside (tuples, lists,
    dicts, namedtuples and registered types such as ``ModelOutput``): such an argument is a graph
    input, any other is fixed at its value."""
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
