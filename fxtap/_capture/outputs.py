"""What an exported graph returns, and the dict a tapped call returns built around it.

torch.export returns tensors (and symbolic sizes); a tapped call returns a dict whose values may
also hold constants of the call's signature (a dtype, ``None``) and plain Python objects that the
forward made and filled with tensors: a transformers ``DynamicCache`` in a kept output (its
layers' keys and values). ``Outputs.split`` (while torch.export traces) keeps the structure and
the constants and hands the tensors to the graph; ``Outputs.rebuild`` (every later call) puts the
graph's tensors back, making each such object anew, as the eager forward does, of the same class
with the same attributes. Nothing is registered with torch's pytree: no global state changes,
and a cache stays a ``DynamicCache`` that generation can go on from.

An object is rebuilt only when all of its state is understood (``__dict__`` of tensors, simple
values, lists, tuples, dicts and such objects; a plain ``__new__``; no slots) and the call made it:
an object that the model holds or that came in as an argument is refused (``TypeError``), and the
export frontend keeps mixed mode, with the reason in ``report()``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["Outputs", "made_before"]


class Outputs(NamedTuple):
    """The dict a call returns, split into what the graph computes (tensors) and the rest: its
    structure, constants of the signature (a dtype, a size, ``None``), which torch.export cannot
    return and bakes in anyway, and templates of the objects to make anew (``_Object``)."""

    spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # per leaf: the constant, a _Slot (computed), or an _Object template

    @classmethod
    def split(cls, value: Any, existing: frozenset[int] = frozenset()) -> tuple[Outputs, list[Any]]:
        """``existing``: ids of objects that the call did not make (``made_before``), which fxtap
        must neither copy nor return from a graph."""
        leaves, spec = pytree.tree_flatten(value)
        computed: list[Any] = []
        objects: dict[int, _Object] = dict.fromkeys(existing, _EXISTING)
        constants = tuple(_template(leaf, computed, objects, _DEPTH) for leaf in leaves)
        return cls(spec, constants), computed

    def rebuild(self, computed: list[Any]) -> dict[str, Any]:
        made: dict[int, Any] = {}
        leaves = [_fill(c, computed, made) for c in self.constants]
        return pytree.tree_unflatten(leaves, self.spec)  # type: ignore[no-any-return]

    def positions(self) -> dict[Any, list[int]]:
        """Per key of the returned dict, the positions of the graph outputs its value holds."""
        tree = pytree.tree_unflatten(list(self.constants), self.spec)
        if not isinstance(tree, dict):
            return {}
        return {key: _positions(template) for key, template in tree.items()}


def _positions(template: Any, seen: set[int] | None = None) -> list[int]:
    seen = set() if seen is None else seen
    if isinstance(template, _Slot):
        return [template.position]
    if isinstance(template, _Seq):
        return [p for item in template.items for p in _positions(item, seen)]
    if isinstance(template, _Map):
        return [p for pair in template.items for item in pair for p in _positions(item, seen)]
    if isinstance(template, (list, tuple)):  # a container pytree flattened
        return [p for item in template for p in _positions(item, seen)]
    if isinstance(template, dict):
        return [p for item in template.values() for p in _positions(item, seen)]
    if isinstance(template, _Object) and id(template) not in seen:  # an object twice, or a cycle: once
        seen.add(id(template))
        return [p for field in template.fields.values() for p in _positions(field, seen)]
    return []


def made_before(model: nn.Module, arguments: list[Any]) -> frozenset[int]:
    """Ids of the objects a call's output may hold that the call did not make: the arguments and
    what the model's modules hold (their config, for one)."""
    held = [value for module in model.modules() for value in vars(module).values()]
    return frozenset(map(id, [*arguments, *held]))


class _Slot(NamedTuple):
    """A value the graph computes: its position among the graph's outputs."""

    position: int


class _Object:
    """An object of the output, to be made anew on every call: its class, and a template of each
    attribute (a constant, a ``_Slot``, a container of templates, another ``_Object``)."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.fields: dict[str, Any] = {}


class _Seq(NamedTuple):
    kind: type  # list or tuple
    items: tuple[Any, ...]


class _Map(NamedTuple):
    items: tuple[tuple[Any, Any], ...]


_DEPTH = 8  # how deep an output object's attributes are followed
_EXISTING = _Object(object)  # marks an object the call did not make
_TRACED = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _template(value: Any, computed: list[Any], objects: dict[int, _Object], depth: int) -> Any:
    """``value`` with its tensors replaced by ``_Slot``s (appended to ``computed``), or TypeError
    when it holds something that a graph cannot return and fxtap does not rebuild."""
    if isinstance(value, _TRACED):
        computed.append(value)
        return _Slot(len(computed) - 1)
    if isinstance(value, _CONSTANTS):
        return value
    refusal = TypeError(f"a tapped value holds a {type(value).__name__}, which torch.export cannot return")
    if depth == 0:
        raise refusal
    if type(value) in (list, tuple):
        return _Seq(type(value), tuple(_template(v, computed, objects, depth - 1) for v in value))
    if type(value) is dict:
        return _Map(tuple((_template(k, computed, objects, depth - 1), _template(v, computed, objects, depth - 1)) for k, v in value.items()))
    if not _rebuildable(value):
        raise refusal
    if objects.get(id(value)) is _EXISTING:
        raise TypeError(f"a tapped value holds a {type(value).__name__} that the call did not make, which a graph cannot return")
    if id(value) in objects:  # the same object twice (or a cycle): one object again
        return objects[id(value)]
    found = objects[id(value)] = _Object(type(value))
    found.fields = {k: _template(v, computed, objects, depth - 1) for k, v in vars(value).items()}
    return found


def _rebuildable(value: Any) -> bool:
    """A plain Python object, whose state is its ``__dict__``: a plain ``__new__``, no slots (an
    ABC's empty ones aside), not a module, class, function or an object of torch's."""
    kind = type(value)
    return (
        isinstance(getattr(value, "__dict__", None), dict)
        and kind.__new__ is object.__new__
        and not any(c.__dict__.get("__slots__") for c in kind.__mro__)
        and not isinstance(value, (nn.Module, type, torch.Tensor))
        and not callable(value)
        and kind.__module__.split(".")[0] not in ("torch", "builtins")
    )


def _fill(template: Any, computed: list[Any], made: dict[int, Any]) -> Any:
    """The value of ``template`` for this call: the graph's tensors in their places, new objects."""
    if isinstance(template, _Slot):
        return computed[template.position]
    if isinstance(template, _Seq):
        items = [_fill(v, computed, made) for v in template.items]
        return items if template.kind is list else tuple(items)
    if isinstance(template, _Map):
        return {_fill(k, computed, made): _fill(v, computed, made) for k, v in template.items}
    if isinstance(template, _Object):
        if id(template) in made:
            return made[id(template)]
        value: Any = object.__new__(template.kind)  # _rebuildable: its class's __new__ is object's
        made[id(template)] = value
        value.__dict__.update({k: _fill(v, computed, made) for k, v in template.fields.items()})
        return value
    return template
