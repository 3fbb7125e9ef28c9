"""Edits: replace a named value by a function of it, inside a graph or from a forward hook.

Every edit is an ``nn.Module`` called on the value (``Patch`` for a tensor, ``Apply`` for a
callable, the user's own module otherwise), so that one object serves both paths, its parameters
are submodules of the ``Edited`` and a graph can call it as a ``call_module`` node.

In a graph (``insert``), the edit node is placed right after the node that produced the value
(a module's output: the module's last node), and every later use of the value, and of the nodes
that are the *same tensor* (an in-place op's input and result), reads the edit's result instead:
as if the model's code had the edit written in that line. A ``Patch`` returns the user's tensor
itself; a copy is taken only where a later in-place op would write into it (``protect``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import Argument

from .._errors import FxtapError
from .._values import copy_value
from .codegen import Made, materialize
from .model import stand_in
from .prune import same_tensor

__all__ = ["Apply", "Inserted", "Patch", "as_modules", "insert", "protect"]

HOLDER = "fxtap_edits"  # the attribute of a graph's root that holds its edit modules


class Patch(nn.Module):
    """A tensor edit: the value is replaced by ``tensor``, broadcast as in ``torch.where``."""

    _fxtap_pure = True  # its result never aliases its input and it writes nothing (see prune)
    tensor: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        super().__init__()
        self.name = name
        self.register_buffer("tensor", tensor, persistent=False)

    def forward(self, value: Any) -> torch.Tensor:
        tensor = self.tensor
        if not isinstance(value, torch.Tensor):
            raise FxtapError(
                f"edit {self.name!r}: a tensor cannot replace a value of type {type(value).__name__}; "
                "edit it with a function (value -> replacement) instead."
            )
        if tensor.dim() <= value.dim():
            try:  # the common case, the patch's dims fit the value's: no shape arithmetic to guard on
                return tensor.expand_as(value).contiguous()  # dense: kernels then run as on any value
            except RuntimeError:
                pass  # the value broadcasts up to the patch, or nothing broadcasts: below
        try:
            shape = torch.broadcast_shapes(tensor.shape, value.shape)
        except RuntimeError as error:
            raise FxtapError(
                f"edit {self.name!r}: a tensor of shape {tuple(tensor.shape)} cannot replace a value of shape "
                f"{tuple(value.shape)}: the shapes must broadcast (as in torch.where).\n"
                f"  Pass a tensor of shape {tuple(value.shape)} or one that broadcasts to it."
            ) from error
        return tensor.expand(shape).contiguous()

    def extra_repr(self) -> str:
        return f"{self.name!r}, shape={tuple(self.tensor.shape)}"


class Apply(nn.Module):
    """A callable edit: the value is replaced by ``fn(value)``."""

    def __init__(self, name: str, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.name = name
        self.fn = fn

    def forward(self, value: Any) -> Any:
        return self.fn(value)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {getattr(self.fn, '__qualname__', type(self.fn).__name__)}"


def as_modules(edits: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Each edit as a module: a tensor becomes a ``Patch``, a module stays itself, any other
    callable becomes an ``Apply``."""
    modules: dict[str, nn.Module] = {}
    for name, edit in edits.items():
        if not isinstance(name, str):
            raise TypeError(f"edit names must be tap names (str), not {type(name).__name__}: {name!r}")
        if isinstance(edit, torch.Tensor):
            modules[name] = Patch(name, edit)
        elif isinstance(edit, nn.Module):
            modules[name] = edit
        elif callable(edit):
            modules[name] = Apply(name, edit)
        else:
            raise TypeError(
                f"edit {name!r}: expected a callable (value -> replacement), a tensor or an nn.Module, "
                f"not {type(edit).__name__}"
            )
    return modules


@dataclass
class Inserted:
    """What ``insert`` did to a graph."""

    root: nn.Module  # the graph's root, with the edit modules under ``HOLDER``
    patches: list[fx.Node] = field(default_factory=list)  # the Patch nodes (they return the user's tensor)
    _history: dict[fx.Node, list[tuple[Any, fx.Node]]] = field(default_factory=dict)  # node -> [(edit key, replacement)]

    def remap(self, value: Argument, key: Any) -> Argument:
        """``value`` as seen at ``key`` (a point's place in graph order): nodes edited at or
        before that place are replaced by the edit's result."""

        def pick(node: fx.Node) -> fx.Node:
            found = node
            for edit_key, replacement in self._history.get(node, ()):
                if edit_key <= key:
                    found = replacement
            return found

        return fx.node.map_arg(value, pick)

    def end(self, value: Argument) -> Argument:
        """``value`` read after the whole graph ran (the model's own output)."""
        return self.remap(value, (float("inf"),))


def order_key(position: dict[fx.Node, int], moment: fx.Node, kind: str, name: str) -> tuple[Any, ...]:
    """Where a point sits in time: after its moment; an op before a module output taken at the
    same node, an inner module before an outer one (the inner one returns first)."""
    return (position[moment], 0 if kind != "module" else 1, -name.count("."), name)


def insert(graph: fx.Graph, root: nn.Module, points: Mapping[str, Any], edits: Mapping[str, nn.Module]) -> Inserted:
    """Insert ``edits`` (tap name -> module) into ``graph`` (a copy the caller owns).

    ``points`` maps each edited name to its ``TapPoint`` with nodes of ``graph``. Returns the
    graph's new root (a twin of ``root`` holding the edit modules; ``root`` is not changed).
    """
    holder = nn.Module()
    twin = stand_in(root)
    twin.__dict__["_modules"] = {**root._modules, HOLDER: holder}  # a new dict: the model's is untouched
    done = Inserted(twin)
    position = {node: i for i, node in enumerate(graph.nodes)}
    alike = same_tensor(graph, root)
    tail: dict[fx.Node, fx.Node] = {}  # moment -> the last node inserted after it
    ordered = sorted(edits, key=lambda n: order_key(position, points[n].moment, points[n].kind, n))
    for index, name in enumerate(ordered):
        point, module = points[name], edits[name]
        key = order_key(position, point.moment, point.kind, name)
        target = f"e{index}"
        holder.add_module(target, module)
        value = done.remap(point.value, key)
        with graph.inserting_before(tail.get(point.moment, point.moment).next):  # in creation order
            node = graph.call_module(f"{HOLDER}.{target}", (materialize(graph, value),))
        node.meta["fxtap_scope"] = points[name].scope
        node.meta["fxtap_edit"] = name
        tail[point.moment] = _unpack(graph, node, point.value, done, key, position, point.moment, alike)
        if isinstance(module, Patch):
            done.patches.append(node)
    return done


def _unpack(
    graph: fx.Graph,
    node: fx.Node,
    value: Argument,
    done: Inserted,
    key: Any,
    position: dict[fx.Node, int],
    moment: fx.Node,
    alike: Callable[[fx.Node], list[fx.Node]],
) -> fx.Node:
    """Route later uses of each node of ``value`` (and of the nodes that are the same tensor)
    to the matching part of the edit's result; return the last node inserted."""
    last = node
    parts: list[tuple[fx.Node, fx.Node]] = []

    def walk(item: Argument, result: fx.Node) -> None:
        nonlocal last
        if isinstance(item, fx.Node):
            parts.append((item, result))
            return
        getter: Any = operator.getitem
        pairs: list[tuple[Any, Any]]
        if isinstance(item, Made):  # a namedtuple, dataclass or ModelOutput: its fields
            pairs = list(item.fields.items())
            getter = operator.getitem if issubclass(item.cls, dict) else getattr
        else:
            pairs = list(item.items()) if isinstance(item, dict) else list(enumerate(item)) if isinstance(item, (tuple, list)) else []
        for k, sub in pairs:
            if not _has_node(sub):
                continue
            with graph.inserting_after(last):
                part = graph.call_function(getter, (result, k))
            last = part
            walk(sub, part)

    walk(value, node)
    cutoff = position[moment]
    for original, replacement in parts:
        for member in alike(original):
            if position.get(member, cutoff + 1) > cutoff:
                continue  # a node made after the edit point is computed from the edit already
            current = done.remap(member, key)
            if not isinstance(current, fx.Node):
                raise AssertionError(f"expected a node for {member}, got {type(current).__name__}")
            for user in list(current.users):
                if position.get(user, -1) > cutoff:  # original nodes after the edit point (inserted ones never)
                    user.replace_input_with(current, replacement)
            done._history.setdefault(member, []).append((key, replacement))
    return last


def _has_node(value: Argument) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def protect(graph: fx.Graph, patches: list[fx.Node], written_after: Callable[[fx.Node], bool]) -> dict[fx.Node, fx.Node]:
    """Copy a Patch's result (the user's tensor) where a later in-place op writes into it, and
    only there; every use of it reads the copy. Returns each copied node -> its copy."""
    copies: dict[fx.Node, fx.Node] = {}
    for node in patches:
        if not written_after(node):
            continue
        with graph.inserting_after(node):
            copy = graph.call_function(copy_value, (node,))
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        copies[node] = copy
    return copies
