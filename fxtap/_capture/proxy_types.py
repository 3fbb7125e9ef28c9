"""Type checks on a traced value that a Proxy answers exactly as the value would.

``isinstance(x, list)`` on a Proxy is ``False``; on the value the model sees it is ``False`` too
when that value is certainly a tensor. ``hazards.type_read`` asks ``answered_alike`` before it
makes such a check a hazard, so that code like timm's ``if isinstance(x_feat, list):`` (CoaT's
head) does not send a whole model to eager mode. Everything here errs on the side of "not
known": an unknown class, an unknown producer, a class a tensor might be an instance of.

A value is *certainly a tensor* when the node that made it is

- a call of a function of torch whose every overload returns one ``Tensor`` (its TorchScript
  schemas; ``torch.cat``, ``torch.relu``), or of a Python function of ``torch.nn.functional``
  annotated to return ``Tensor`` (``F.layer_norm``);
- a tensor method of such an op (``x.view(...)``, ``x.transpose(...)``) called on a value that
  is certainly a tensor;
- a call of a ``torch.nn`` module whose ``forward`` is annotated to return ``Tensor`` (but
  ``nn.Identity``, which returns whatever it is given).

The classes asked about are read from the bytecode of the check: a name (``list``) or a tuple of
names (``(list, tuple)``) loaded right before the call, resolved in the asking frame.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
from typing import Any

import torch
from torch import fx

__all__ = ["answered_alike"]

# classes no tensor is an instance of: a Proxy (not one either) answers ``isinstance`` alike
_NEVER_TENSORS = frozenset({list, tuple, dict, set, frozenset, str, bytes, int, float, complex, bool, type(None), range, slice})
# torch.nn modules annotated "-> Tensor" that return whatever they are given (a list, too)
_PASS_ANYTHING = frozenset({torch.nn.Identity})
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST", "LOAD_CONST"})


def answered_alike(node: fx.Node | None, root: Any, frame: Any) -> bool:
    """Whether the ``isinstance`` check at ``frame``'s current instruction, on the value of
    ``node``, has the same answer for the Proxy as for the value the model sees."""
    if node is None:
        return False
    classes = _checked_classes(frame)
    return classes is not None and all(c in _NEVER_TENSORS for c in classes) and _certainly_tensor(node, root, 0)


def _checked_classes(frame: Any) -> tuple[type, ...] | None:
    """The classes of ``isinstance(value, classes)`` whose call is at ``frame``'s instruction,
    when they are a name or a tuple of names; ``None`` when not understood."""
    loads = _class_loads(frame.f_code, frame.f_lasti)
    if loads is None:
        return None
    found = []
    for opname, name in loads:
        if opname == "LOAD_CONST":
            value = name
        elif opname == "LOAD_FAST" or opname == "LOAD_DEREF":
            value = frame.f_locals.get(name, _UNKNOWN)
        else:
            value = frame.f_globals.get(name, getattr(builtins, name, _UNKNOWN))
        if not isinstance(value, type):
            return None
        found.append(value)
    return tuple(found)


_UNKNOWN = object()


@functools.lru_cache(maxsize=4096)
def _class_loads(code: Any, lasti: int) -> tuple[tuple[str, Any], ...] | None:
    """The loads of the second argument of the two-argument call at ``lasti`` of ``code``: one
    load, or the loads of a ``BUILD_TUPLE`` of loads. ``None`` for anything else."""
    instructions = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "NOP")]
    at = next((i for i, ins in enumerate(instructions) if ins.offset == lasti), None)
    if at is None:
        return None
    call = instructions[at]
    if call.opname == "PRECALL":  # 3.11: lasti may be the PRECALL or the CALL after it
        at += 1
        call = instructions[at] if at < len(instructions) else call
    if call.opname not in ("CALL", "CALL_FUNCTION") or call.arg != 2:
        return None
    before = [ins for ins in instructions[:at] if ins.opname not in ("PRECALL", "KW_NAMES")]
    if not before:
        return None
    last = before[-1]
    if last.opname in _LOADS:
        return ((last.opname, last.argval),)
    if last.opname == "BUILD_TUPLE" and last.arg:
        items = before[-1 - last.arg : -1]
        if len(items) == last.arg and all(ins.opname in _LOADS for ins in items):
            return tuple((ins.opname, ins.argval) for ins in items)
    return None


def _certainly_tensor(node: fx.Node, root: Any, depth: int) -> bool:
    if depth > 32:
        return False
    if node.op == "call_function":
        return _returns_tensor(node.target)
    if node.op == "call_method":
        owner = node.args[0] if node.args else None
        return isinstance(owner, fx.Node) and _certainly_tensor(owner, root, depth + 1) and _aten_returns_tensor(str(node.target))
    if node.op == "call_module":
        try:
            module = root.get_submodule(str(node.target))
        except AttributeError:
            return False
        kind = type(module)
        if not kind.__module__.startswith("torch.nn.") or kind in _PASS_ANYTHING:
            return False  # a user's annotation is a promise, not a fact
        return _annotated_tensor(kind.forward)
    return False


@functools.lru_cache(maxsize=1024)
def _returns_tensor(target: Any) -> bool:
    name = getattr(target, "__module__", None) or ""
    if name == "torch.nn.functional":
        return _annotated_tensor(target)
    if not (name == "torch" or name.startswith("torch.")):  # ``operator.add`` adds ints as well as tensors
        return False
    from torch.jit._builtins import _find_builtin

    try:
        op = _find_builtin(target)
    except Exception:  # an unhashable or odd callable: not known
        return False
    return op is not None and _aten_returns_tensor(op.split("::", 1)[-1])


# ops whose Python binding may return something their schemas do not say: ``nonzero(as_tuple=True)`` is a tuple
_BINDING_DIFFERS = frozenset({"nonzero"})


@functools.lru_cache(maxsize=1024)
def _aten_returns_tensor(name: str) -> bool:
    """Whether every overload of ``aten::name`` returns exactly one ``Tensor``."""
    if name in _BINDING_DIFFERS:
        return False
    schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    return bool(schemas) and all(len(s.returns) == 1 and str(s.returns[0].type) == "Tensor" for s in schemas)


def _annotated_tensor(function: Any) -> bool:
    try:
        annotation = inspect.signature(function).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is torch.Tensor or annotation in ("Tensor", "torch.Tensor")
