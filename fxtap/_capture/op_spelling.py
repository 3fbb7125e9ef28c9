"""What FX calls a torch call that eager code makes: the spelling half of ``eager_ops``.

A ``TorchFunctionMode`` sees ``x / y`` and ``x.div(y)`` as the same function, ``TensorBase.div``;
FX's Proxy sees the operator and records ``operator.truediv`` (``truediv``) for the first and the
method ``div`` for the second. ``spelling`` tells them apart by the instruction that made the
call (``BINARY_OP /``), as FX's Proxy itself reads bytecode to unpack a tuple. ``shape_words``
lists what FX may also record on a traced size, dtype or device (``x.shape[1] + 1``), which
eager code does not show; ``fx_wrapped`` the functions FX records as one call.
"""

from __future__ import annotations

import dis
import functools
import math
import operator
from types import CodeType, FrameType
from typing import Any

import torch

from . import names as _names

__all__ = ["fx_wrapped", "kind", "op_words", "shape_words", "spelling"]


@functools.cache
def op_words() -> frozenset[str]:
    """Every base name an op can have: torch functions and methods, operators (``truediv``)."""
    words = {*dir(torch), *dir(torch.Tensor), *dir(torch.nn.functional), *dir(operator), *_BINARY.values(), *_INPLACE.values()}
    return frozenset(_names.op_base_name(w) for w in words if not w.startswith("_") or w.startswith("__")) - {"getattr"}


_BINARY = {"+": "add", "-": "sub", "*": "mul", "/": "truediv", "//": "floordiv", "%": "mod", "**": "pow", "@": "matmul",
           "<<": "lshift", ">>": "rshift", "&": "and_", "|": "or_", "^": "xor"}  # fmt: skip
_INPLACE = {f"{symbol}=": _names.op_base_name("i" + op.rstrip("_")) for symbol, op in _BINARY.items()}
_COMPARE = {"<": "lt", "<=": "le", "==": "eq", "!=": "ne", ">": "gt", ">=": "ge"}
_UNARY = {"UNARY_NEGATIVE": "neg", "UNARY_POSITIVE": "pos", "UNARY_INVERT": "invert", "BINARY_SUBSCR": "getitem",
          "BINARY_SLICE": "getitem", "STORE_SUBSCR": "setitem", "STORE_SLICE": "setitem"}  # fmt: skip
# Python protocols: never an FX node (FX fails on them, or iterates a proxy by getitem)
_PROTOCOL = frozenset(
    ["bool", "len", "iter", "int", "float", "index", "complex", "format", "repr", "str", "hash", "contains", "reversed", "array", "array_wrap", "deepcopy", "reduce_ex", "setstate", "dir", "nonzero"]
)


@functools.lru_cache(maxsize=512)
def _instructions(code: CodeType) -> dict[int, tuple[str, str]]:
    return {i.offset: (i.opname, i.argrepr) for i in dis.get_instructions(code)}


def _from_instruction(frame: FrameType | None) -> str:
    """The FX name of the operator the calling instruction applies ("" for a call)."""
    if frame is None:
        return ""
    opname, arg = _instructions(frame.f_code).get(frame.f_lasti, ("", ""))
    if opname == "BINARY_OP":
        return _INPLACE.get(arg) or _BINARY.get(arg, "")
    if opname == "COMPARE_OP":
        return _COMPARE.get(arg, "")
    if opname == "CALL_INTRINSIC_1" and arg == "INTRINSIC_UNARY_POSITIVE":
        return "pos"
    return _UNARY.get(opname, "")


def spelling(func: Any, caller: FrameType | None) -> tuple[str, str]:
    """``(kind, base name)`` of a torch call; kind is ``op``, ``getter`` (``x.shape``) or ``protocol``."""
    raw = getattr(func, "__name__", "op")
    if raw == "__get__":
        return "getter", "getattr"
    dunder = raw[2:-2] if raw.startswith("__") and raw.endswith("__") and len(raw) > 4 else ""
    if dunder in _PROTOCOL:
        return "protocol", dunder
    from_operator = _from_instruction(caller)  # ``x / y`` and ``x.div(y)`` reach torch alike
    if from_operator:
        return "op", from_operator
    return "op", _dunder_name(dunder) if dunder else _names.op_base_name(raw)


def _dunder_name(inner: str) -> str:
    """FX's name of a Python-level operator method of torch (``__rsub__`` -> ``sub``)."""
    if inner in ("div", "rdiv", "rtruediv", "idiv"):
        inner = "itruediv" if inner == "idiv" else "truediv"
    elif inner.startswith("r") and not hasattr(operator, f"__{inner}__") and hasattr(operator, f"__{inner[1:]}__"):
        inner = inner[1:]  # a reflected operator: FX records operator.<op> with the arguments swapped
    found = getattr(operator, f"__{inner}__", None)
    return _names.op_base_name(found.__name__ if found is not None else inner)


def kind(value: Any) -> str:
    """Which kind of traced non-tensor FX would hold: ``dtype``, ``device`` or ``number`` (sizes,
    numbers, tuples and anything else)."""
    return "dtype" if isinstance(value, torch.dtype) else "device" if isinstance(value, torch.device) else "number"


@functools.cache
def shape_words(kind: str) -> frozenset[str]:
    """What FX may also record on a traced non-tensor of ``kind``: for sizes, numbers and tuples
    every Python operator, ``getattr``, ``math`` functions and their types' methods; for a dtype
    or a device, comparisons, ``getattr`` and their methods."""
    words = {"eq", "ne", "getattr"}
    types: tuple[type, ...] = (torch.dtype,) if kind == "dtype" else (torch.device,) if kind == "device" else ()
    if kind == "number":
        words |= {*_BINARY.values(), *_INPLACE.values(), *_COMPARE.values(), *_UNARY.values(), "div"}
        words |= {w for w in dir(math) if not w.startswith("_")}
        types = (int, float, bool, tuple, list, dict, str, torch.Size)
    for cls in types:
        words |= {w for w in dir(cls) if not w.startswith("_")}
    return frozenset(_names.op_base_name(w) for w in words)


def fx_wrapped(extra: tuple[Any, ...]) -> dict[CodeType, str]:
    """The code of every function FX records as one call (``torch.fx.wrap``, ``autowrap_functions``)."""
    from torch.fx import _symbolic_trace  # private: the registry torch.fx.wrap fills

    functions = [g.get(n) for (_, n), g in getattr(_symbolic_trace, "_wrapped_fns_to_patch", {}).items()]
    functions += [getattr(c, n, None) for c, n in getattr(_symbolic_trace, "_wrapped_methods_to_patch", [])]
    functions += list(extra)
    return {f.__code__: f.__name__ for f in functions if hasattr(f, "__code__")}
