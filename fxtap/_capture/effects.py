"""What one graph op does besides computing its result, read from the operator's schema.

Three facts per ``call_function`` / ``call_method`` node, which ``prune`` needs:

* **writes**: the arguments it writes into (``Tensor(a!)`` in the schema: ``add_``, ``copy_``,
  ``index_copy_``, ``out=``, a ``torch.library.custom_op`` with ``mutates_args``);
* **aliases**: the arguments its result may share storage with (``Tensor(a)`` in the schema:
  ``view``, ``reshape``, ``to``, ``contiguous``; ``Tensor(a -> *)``: ``split``'s list of views;
  in an export graph also what its fake values show: ``type_as`` returns its input);
* **draws**: whether it draws from the random number generator (the ``nondeterministic_seeded``
  tag: ``dropout``, ``bernoulli_``, ``rand``, ``scaled_dot_product_attention``...), given its
  arguments: an op called with ``train=False`` / ``training=False`` or ``dropout_p=0`` draws nothing.

A target is resolved to aten operators when it is one (an ``OpOverload`` used directly, such as
``torch.ops.aten.relu_.default`` or a custom op), an overload packet (all its overloads count),
a builtin of ``torch`` (``torch.add``, ``F.scaled_dot_product_attention``) or a tensor method
(``x.index_copy_``). The facts of several overloads are united, which over-approximates: it may
keep or copy more, never less. Python functions have no schema: for them (``F.relu(x,
inplace=True)``, ``F.dropout2d``, ``F.fractional_max_pool2d``, ``operator.iadd``, user functions
FX kept whole) the rules below fall back to their parameters and to short name lists.

The schema lookup of a target is cached (``_facts``): an operator's schema never changes, and a
graph calls the same few targets many times.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import torch
from torch import fx

from . import names as _names

__all__ = ["aliased", "draws_random", "inplace", "may_draw", "opaque_function", "written"]

# Results that may be (a view of) an argument although no schema says so: Python-level code,
# attribute reads, and ops that return their input unchanged in some modes (dropout in eval).
_VIEW_LIKE = frozenset(
    """
    view view_as reshape reshape_as flatten unflatten squeeze unsqueeze transpose permute t T mT H mH
    adjoint expand expand_as broadcast_to broadcast_tensors narrow select split split_with_sizes chunk
    unbind tensor_split hsplit vsplit dsplit movedim moveaxis swapaxes swapdims diagonal as_strided
    unfold detach detach_ contiguous to type type_as float half double bfloat16 int long bool cpu cuda
    view_as_real view_as_complex real imag data alias getitem getattr atleast_1d atleast_2d atleast_3d
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout identity squeeze_ unsqueeze_
    """.split()
)
_INPLACE_OPERATORS = frozenset(getattr(operator, f"i{name}") for name in _names.INPLACE_OPERATORS) | {operator.setitem}
# Python functions of torch that draw from the RNG but have no seeded aten op of their name.
_PYTHON_RANDOM = frozenset(
    """
    dropout1d dropout2d dropout3d feature_alpha_dropout gumbel_softmax fractional_max_pool2d
    fractional_max_pool3d fractional_max_pool2d_with_indices fractional_max_pool3d_with_indices
    """.split()
)
# Ops that update running statistics in training although their schema does not mark them written.
_RUNNING_STATS = frozenset({"batch_norm", "instance_norm", "native_batch_norm"})
# Arguments that, set to these values, turn a random op into a deterministic one.
_NO_DRAW = (("train", False), ("training", False), ("dropout_p", 0))
_KNOWN_FUNCTION_PACKAGES = frozenset({"torch", "_operator", "operator", "builtins", "math", "fxtap"})
_MISSING = object()


class _Facts(NamedTuple):
    writes: tuple[tuple[int, str], ...]  # (position, name) of written arguments (-1: keyword only)
    aliases: tuple[tuple[int, str], ...]  # arguments the result may share storage with
    seeded: bool  # some overload draws from the RNG
    parameters: tuple[tuple[str, int, Any], ...]  # (name, position, default) for argument binding


_NONE = _Facts((), (), False, ())


def written(node: fx.Node) -> list[fx.Node]:
    """The nodes a ``call_function`` / ``call_method`` node writes into."""
    if node.op == "call_function" and opaque_function(node.target):
        return list(node.all_input_nodes)  # its code is unseen: it may write any argument
    found = [n for arg in _facts(node.op, node.target).writes for n in _nodes(_argument(node, arg))]
    if node.target in _INPLACE_OPERATORS or _inplace_by_name(node):
        found += _nodes(node.args[0] if node.args else next(iter(node.kwargs.values()), None))
    found += _nodes(node.kwargs.get("out"))
    if _name(node) in _RUNNING_STATS and not any(_equals(_bound(node, flag), False) for flag in ("training", "use_input_stats")):
        found += [n for stat in ("running_mean", "running_var") for n in _nodes(_bound(node, stat))]
    return list(dict.fromkeys(found))


def inplace(node: fx.Node) -> bool:
    """Whether ``node`` is an in-place op: its result is its first argument, written (``x.relu_()``, ``x += y``)."""
    return node.target in _INPLACE_OPERATORS or _inplace_by_name(node)


def aliased(node: fx.Node) -> list[fx.Node]:
    """The nodes whose storage the result of ``node`` may share (over-approximated)."""
    if node.op == "call_function" and opaque_function(node.target):
        return list(node.all_input_nodes)  # it may return (a view of) an argument
    found = [n for arg in _facts(node.op, node.target).aliases for n in _nodes(_argument(node, arg))]
    if _name(node) in _VIEW_LIKE or node.target in _INPLACE_OPERATORS or _inplace_by_name(node):
        found += _nodes(node.args[0] if node.args else next(iter(node.kwargs.values()), None))
    return list(dict.fromkeys(found + _sharing_storage(node)))


def _sharing_storage(node: fx.Node) -> list[fx.Node]:
    """The input nodes whose traced value shares storage with ``node``'s, where the graph recorded
    its values (an export graph's ``meta["val"]``, fake tensors whose storages alias as the real
    ones do). Its aten ops include composite ones whose schema marks no alias but whose code may
    return an argument or a view of it: ``type_as``, ``atleast_2d``, ``broadcast_tensors``,
    ``einsum``, an eval-mode ``feature_dropout`` (``nn.Dropout2d``)."""
    mine = _storages(node.meta.get("val"))
    return [n for n in node.all_input_nodes if mine & _storages(n.meta.get("val"))] if mine else []


def _storages(value: Any) -> set[int]:
    found: set[int] = set()
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            try:
                found.add(leaf.untyped_storage()._cdata)
            except Exception:  # noqa: BLE001, S112 - a tensor without storage (sparse, nested): no fact
                continue
    return found


def draws_random(node: fx.Node) -> bool:
    """Whether running ``node`` draws from the RNG, for the argument values it was traced with."""
    if node.op not in ("call_function", "call_method"):
        return False
    opaque = node.op == "call_function" and opaque_function(node.target)  # unseen code may draw
    if not (opaque or _facts(node.op, node.target).seeded or _name(node) in _PYTHON_RANDOM):
        return False
    return not any(_equals(_bound(node, name), value) for name, value in _NO_DRAW)


def _equals(bound: Any, value: Any) -> bool:
    return isinstance(bound, (bool, int, float)) and bound == value


def may_draw(target: Any) -> bool:
    """Whether calling the torch function ``target`` may draw from the RNG (some overload is
    seeded, or it is a random Python function of torch)."""
    return _facts("call_function", target).seeded or getattr(target, "__name__", "") in _PYTHON_RANDOM


def opaque_function(target: Any) -> bool:
    """A Python function FX kept as one call (``torch.fx.wrap``, autowrap): its body is unseen,
    so it may write into its arguments or return one of them (torchvision's ``_add_shortcut``
    and ``stochastic_depth`` do). Functions of torch itself are known by name instead; a higher
    order op of an export graph (its body is a subgraph) counts as unseen too."""
    if isinstance(target, torch._ops.HigherOrderOperator):  # an export graph's subgraph call (``with torch.no_grad():``)
        return True
    package = (getattr(target, "__module__", None) or "").split(".")[0]
    return hasattr(target, "__code__") and package not in _KNOWN_FUNCTION_PACKAGES


# -- resolving a target to its schemas ---------------------------------------------------------------
def _facts(op: str, target: Any) -> _Facts:
    try:
        return _cached_facts(op, target)
    except TypeError:  # an unhashable target: look it up every time
        return _facts_of(op, target)


@functools.lru_cache(maxsize=4096)
def _cached_facts(op: str, target: Any) -> _Facts:
    return _facts_of(op, target)


def _facts_of(op: str, target: Any) -> _Facts:
    overloads = _overloads(op, target)
    if overloads is None:
        return _NONE
    writes: set[tuple[int, str]] = set()
    aliases: set[tuple[int, str]] = set()
    parameters: dict[str, tuple[str, int, Any]] = {}
    seeded = False
    for overload in overloads:
        schema = overload._schema
        seeded = seeded or torch.Tag.nondeterministic_seeded in overload.tags
        returned = set().union(*(r.alias_info.before_set for r in schema.returns if r.alias_info is not None))
        for index, argument in enumerate(schema.arguments):
            position = -1 if argument.kwarg_only else index
            info = argument.alias_info
            if info is not None and info.is_write:
                writes.add((position, argument.name))
            # ``add_`` returns ``self``; ``split``/``unbind`` (``Tensor(a -> *)``) a list of views of it, whose
            # alias set the schema puts on the list's elements, not on the return
            if info is not None and (info.before_set & returned or "*" in info.after_set):
                aliases.add((position, argument.name))
            default = argument.default_value if argument.has_default_value() else _MISSING
            parameters.setdefault(argument.name, (argument.name, position, default))
    if hasattr(target, "__code__"):  # a torch Python function: its own parameters bind arguments
        return _Facts((), (), seeded, ())
    return _Facts(tuple(sorted(writes)), tuple(sorted(aliases)), seeded, tuple(parameters.values()))


def _overloads(op: str, target: Any) -> list[Any] | None:
    if isinstance(target, torch._ops.OpOverload):
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _overloads_of(target)
    if op == "call_method" and isinstance(target, str):
        name = target
    elif op == "call_function" and _of_torch(target):
        name = getattr(target, "__name__", "")
    else:
        return None
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("__") else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return _overloads_of(packet)


def _overloads_of(packet: Any) -> list[Any]:
    return [getattr(packet, name) for name in packet.overloads()]


def _of_torch(target: Any) -> bool:
    module = getattr(target, "__module__", None) or getattr(getattr(target, "__objclass__", None), "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


# -- binding arguments ---------------------------------------------------------------------------------
def _argument(node: fx.Node, where: tuple[int, str]) -> Any:
    position, name = where
    if name in node.kwargs:
        return node.kwargs[name]
    if 0 <= position < len(node.args):
        return node.args[position]
    return None


def _bound(node: fx.Node, name: str) -> Any:
    """The value of parameter ``name`` in this call (its default when not passed; ``_MISSING``
    when the target has no such parameter or it cannot be told)."""
    if name in node.kwargs:
        return node.kwargs[name]
    code = getattr(node.target, "__code__", None) if node.op == "call_function" else None
    if code is not None:
        names = code.co_varnames[: code.co_argcount]
        if name in names:
            index = names.index(name)
            if index < len(node.args):
                return node.args[index]
            defaults = getattr(node.target, "__defaults__", None) or ()
            offset = index - (len(names) - len(defaults))
            return defaults[offset] if offset >= 0 else _MISSING
        return (getattr(node.target, "__kwdefaults__", None) or {}).get(name, _MISSING)
    for parameter, position, default in _facts(node.op, node.target).parameters:
        if parameter == name:
            return node.args[position] if 0 <= position < len(node.args) else default
    return _MISSING


def _inplace_by_name(node: fx.Node) -> bool:
    """The fallback for code without a schema: a trailing ``_`` or an ``inplace=True`` flag."""
    name = _name(node)
    if name.endswith("_") and not name.startswith("_"):
        return True
    return _bound(node, "inplace") is True if node.op == "call_function" else node.kwargs.get("inplace") is True


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.target is getattr:
        return "getattr"
    return getattr(node.target, "__name__", "")


def _nodes(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found
