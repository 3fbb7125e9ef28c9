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
  ``nn.Identity``, which returns whatever it is given, and a module with a forward hook or an
  instance ``forward`` of its own, which may return anything).

The classes asked about are read from the bytecode of the check: a name (``list``) or a tuple of
names (``(list, tuple)``) loaded right before the call, with no jump into those loads (``A if c
else list``), resolved in the asking frame as Python resolves them.
"""

from __future__ import annotations

import dis
import functools
import inspect
from typing import Any

import torch
from torch import fx

__all__ = ["UNKNOWN", "answered_alike", "leaves_relied_on", "loaded"]

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


def leaves_relied_on(node: fx.Node) -> list[str]:
    """The module (its path) whose output ``answered_alike`` took for a tensor on the way to
    ``node``: a hook or an own ``forward`` added to it later would make the answer wrong."""
    while node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return [str(node.target)] if node.op == "call_module" else []


def _checked_classes(frame: Any) -> tuple[type, ...] | None:
    """The classes of ``isinstance(value, classes)`` whose call is at ``frame``'s instruction,
    when they are a name or a tuple of names; ``None`` when not understood."""
    loads = _class_loads(frame.f_code, frame.f_lasti)
    if loads is None:
        return None
    found = []
    for opname, name in loads:
        value = loaded(frame, opname, name)
        if not isinstance(value, type):
            return None
        found.append(value)
    return tuple(found)


UNKNOWN = object()  # what ``loaded`` gives for a name it does not find


def loaded(frame: Any, opname: str, name: Any) -> Any:
    """The value that the load instruction ``opname`` of ``name`` pushes in ``frame`` now, or
    ``UNKNOWN``: ``LOAD_CONST`` its constant, ``LOAD_FAST``/``LOAD_DEREF`` a local or a cell,
    ``LOAD_NAME`` (code run by ``eval``/``exec``) the locals first, then the globals, then the
    frame's builtins (its globals' ``__builtins__``, not always the ``builtins`` module)."""
    if opname == "LOAD_CONST":
        return name
    if opname in ("LOAD_FAST", "LOAD_DEREF"):
        return frame.f_locals.get(name, UNKNOWN)
    if opname == "LOAD_NAME" and name in frame.f_locals:
        return frame.f_locals[name]
    if name in frame.f_globals:
        return frame.f_globals[name]
    space = frame.f_builtins
    return space.get(name, UNKNOWN) if isinstance(space, dict) else getattr(space, name, UNKNOWN)


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
        used = [last]
    elif last.opname == "BUILD_TUPLE" and last.arg:
        used = before[-1 - last.arg :]
        if len(used) != last.arg + 1 or not all(ins.opname in _LOADS for ins in used[:-1]):
            return None
    else:
        return None
    # straight-line code from the first load to the call: a jump into it (``A if c else list``,
    # ``self.cls or list``) means the last loads need not be the classes asked about
    span = instructions[instructions.index(used[0]) : at + 1]
    if any(ins.is_jump_target for ins in span):
        return None
    return tuple((ins.opname, ins.argval) for ins in (used if last.opname in _LOADS else used[:-1]))


def _certainly_tensor(node: fx.Node, root: Any, depth: int) -> bool:
    if depth > 32:
        return False
    if node.op == "call_function":
        return _returns_tensor(node.target)
    if node.op == "call_method":
        owner = node.args[0] if node.args else None
        name = str(node.target)
        return isinstance(owner, fx.Node) and _torchs_method(name) and _certainly_tensor(owner, root, depth + 1) and _aten_returns_tensor(name)
    if node.op == "call_module":
        try:
            module = root.get_submodule(str(node.target))
        except AttributeError:
            return False
        kind = type(module)
        if not kind.__module__.startswith("torch.nn.") or kind in _PASS_ANYTHING:
            return False  # a user's annotation is a promise, not a fact
        if "forward" in module.__dict__ or _returns_through_hooks(module):
            return False  # an instance's own forward, or a forward hook, may return anything
        if not (getattr(kind.forward, "__module__", None) or "").startswith("torch.nn."):
            return False  # a user's forward put on torch's class: its annotation is the user's too
        return _annotated_tensor(kind.forward)
    return False


def _torchs_method(name: str) -> bool:
    """Whether ``torch.Tensor.<name>`` is torch's own (not a function a user put on the class)."""
    method = getattr(torch.Tensor, name, None)
    return type(method).__name__ == "method_descriptor" or (getattr(method, "__module__", None) or "").startswith("torch.")


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


def _returns_through_hooks(module: Any) -> bool:
    """Whether a forward hook (the module's own or a global one) may replace what ``module`` returns."""
    from torch.nn.modules import module as _module

    own = module.__dict__.get("_forward_hooks") or {}
    return any(not getattr(hook, "_fxtap_hook", False) for hook in own.values()) or bool(_module._global_forward_hooks)


def _annotated_tensor(function: Any) -> bool:
    try:
        annotation = inspect.signature(function).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is torch.Tensor or annotation in ("Tensor", "torch.Tensor")
