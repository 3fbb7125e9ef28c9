"""Semantics a torch.fx graph cannot hold, detected while tracing so that their code runs eagerly.

A graph records tensor operations; it does not record what Python does around them. Code that
changes a global mode (``torch.no_grad``, ``torch.autocast``, ``torch.inference_mode``,
``torch.utils.checkpoint``'s saved-tensor hooks) or the random generator's state
(``torch.random.fork_rng``, ``torch.manual_seed``), runs user hooks (which ``nn.Module.__call__``
runs and a graph never does), or keeps Python state on a module (``self.step += 1``, a list used
as a cache) would run once, at trace time, and never again. ``watching`` makes each of them raise
``Hazard`` in the forward that does it, so that ``analysis.analyse`` makes that module an opaque
leaf (it runs eagerly, through ``__call__``) and says why.

Code that tells a traced value's type apart (``isinstance(p, tuple)`` on what an opaque leaf
returned, ``isinstance(h, torch.Tensor)``) would see a Proxy, not the tuple, dict, dataclass or
tensor that the model sees, and the graph would hold the branch taken for a Proxy: ``type_read``
(the ``__class__`` that ``isinstance`` reads) makes that a hazard of the forward that asked,
unless the Proxy answers as the value would (``proxy_types``: ``isinstance(x, list)`` on what
is certainly a tensor).

The patches are installed for the duration of a trace only, and act only in the tracing thread:
any other thread gets the original functions.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import proxy_types as _proxy_types

__all__ = ["Hazard", "global_hooks", "is_fxtap_hook", "mark_fxtap_hook", "rng_state_set_raises", "type_read", "user_hooks", "watching"]


class Hazard(RuntimeError):
    """Raised while tracing where the code does something a graph cannot represent."""


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_WORDS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}
_GLOBAL_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")


def mark_fxtap_hook(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a hook as fxtap's own (a capture hook), so that tracing does not treat it as the user's."""
    hook.__dict__["_fxtap_hook"] = True
    return hook


def is_fxtap_hook(hook: Any) -> bool:
    return bool(getattr(hook, "_fxtap_hook", False))


def user_hooks(module: nn.Module) -> str:
    """What user hooks ``module`` has ("forward hook", ...), "" when none."""
    kinds = []
    for attribute in _HOOK_DICTS:
        hooks = module.__dict__.get(attribute)
        if hooks and any(not is_fxtap_hook(hook) for hook in hooks.values()):
            kinds.append(_HOOK_WORDS[attribute])
    return " and ".join(kinds)


def global_hooks() -> str:
    """The global module hooks registered (``register_module_forward_hook`` and friends), "" when none."""
    found = [name.removeprefix("_global_").removesuffix("s").replace("_", " ") for name in _GLOBAL_DICTS if getattr(_module, name)]
    return ", ".join(found)


_LOCK = threading.RLock()  # one trace installs the patches at a time; nested traces share them


class _State(threading.local):
    tracer: Any = None  # the tracer of this thread's trace, None outside tracing
    internal: int = 0  # > 0 while torch.fx itself writes attributes (constants on the root)


_STATE = _State()


@contextmanager
def tracer_internals() -> Iterator[None]:
    """Attribute writes in this block are torch.fx's own (it stores constants on the traced root)."""
    _STATE.internal += 1
    try:
        yield
    finally:
        _STATE.internal -= 1


def _guarded(original: Callable[..., Any], describe: Callable[..., str]) -> Callable[..., Any]:
    def patched(*args: Any, **kwargs: Any) -> Any:
        tracer = _STATE.tracer
        reason = describe(*args, **kwargs) if tracer is not None and not _STATE.internal else ""
        if reason:  # "" : not a hazard after all
            hazard = Hazard(reason)
            tracer.found(hazard)  # kept even if the model's own ``except Exception`` swallows it
            raise hazard
        return original(*args, **kwargs)

    patched.__wrapped__ = original  # type: ignore[attr-defined]
    return patched


def _grad_reason(*args: Any, **kwargs: Any) -> str:
    return "changes the grad mode (torch.no_grad, enable_grad or set_grad_enabled), which a graph cannot record"


def _inference_reason(*args: Any, **kwargs: Any) -> str:
    return "enters torch.inference_mode, which a graph cannot record"


def _autocast_reason(*args: Any, **kwargs: Any) -> str:
    return "enters torch.autocast, which a graph cannot record"


def _saved_reason(*args: Any, **kwargs: Any) -> str:
    return (
        "uses torch.utils.checkpoint or saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks), "
        "which a graph cannot record"
    )


def _rng_reason(*args: Any, **kwargs: Any) -> str:
    return (
        "sets the random number generator's state (torch.random.fork_rng, set_rng_state or manual_seed), "
        "which a graph cannot record: its random draws would move the generator on where the eager forward puts it back"
    )


def _setattr_reason(module: nn.Module, name: str, value: Any) -> str:
    if name in module.__dict__.get("_buffers", {}) or name in module.__dict__.get("_parameters", {}):
        return ""  # rebinding a buffer or parameter: state.rebinding_checked decides (``self.calls += 1`` traces)
    return f"writes the attribute {name!r} of a {type(module).__name__} (Python-side state that a graph cannot record)"


def _patches() -> list[tuple[Any, str, Callable[..., Any]]]:
    autograd = torch._C._autograd
    return [
        (torch._C, "_set_grad_enabled", _grad_reason),
        (torch._C, "_InferenceMode", _inference_reason),
        (torch, "set_autocast_enabled", _autocast_reason),
        (autograd, "_push_saved_tensors_default_hooks", _saved_reason),
        (nn.Module, "__setattr__", _setattr_reason),
        *_rng_patches(),
    ]


def _rng_patches() -> list[tuple[Any, str, Callable[..., Any]]]:
    """The generator's state, as torch.random.fork_rng and seeding code set it (torch.set_rng_state
    and torch.random.set_rng_state are two names of one function: code may look up either)."""
    return [
        *[(owner, name, _rng_reason) for owner in (torch, torch.random) for name in _RNG_SETTERS],
        *[(owner, name, _rng_reason) for owner in (torch.cuda, torch.cuda.random) for name in _CUDA_RNG_SETTERS],
    ]


_RNG_SETTERS = ("set_rng_state", "manual_seed", "seed")
_CUDA_RNG_SETTERS = ("set_rng_state", "set_rng_state_all", "manual_seed", "manual_seed_all", "seed", "seed_all")


@contextmanager
def rng_state_set_raises() -> Iterator[None]:
    """While the block runs, code in this thread that sets the random generator's state raises
    ``Hazard`` (torch.export records random draws, not the state the forward puts back); other
    threads get the original functions."""
    thread = threading.get_ident()
    saved: list[tuple[Any, str, Any]] = []

    def raising(original: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == thread:
                raise Hazard(_rng_reason())
            return original(*args, **kwargs)

        patched.__wrapped__ = original  # type: ignore[attr-defined]
        return patched

    with _LOCK:
        try:
            for owner, name, _ in _rng_patches():
                original = getattr(owner, name)
                saved.append((owner, name, original))
                setattr(owner, name, raising(original))
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)


@contextmanager
def watching(tracer: Any) -> Iterator[None]:
    """Make the hazards above raise ``Hazard`` in this thread while ``tracer`` traces.

    ``tracer.reads_grad_mode`` is set when the traced code reads ``torch.is_grad_enabled()``
    (the graph then holds one branch: the guard keys it on the grad mode).
    """
    with _LOCK:
        outer = _STATE.tracer
        _STATE.tracer = tracer
        saved: list[tuple[Any, str, Any]] = []
        try:
            if outer is None:
                for owner, name, reason in _patches():
                    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                    saved.append((owner, name, original))
                    setattr(owner, name, _guarded(original, reason))
                original_read = torch.is_grad_enabled
                saved.append((torch, "is_grad_enabled", original_read))
                torch.is_grad_enabled = _recording(original_read)  # type: ignore[assignment]
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
            _STATE.tracer = outer


def _recording(original: Callable[[], bool]) -> Callable[[], bool]:
    def is_grad_enabled() -> bool:
        if _STATE.tracer is not None:
            _STATE.tracer.reads_grad_mode = True
        return original()

    return is_grad_enabled


# modules whose code inspects values on the model's behalf: a type check made there was asked by
# the frame that called them (``isinstance(p, nn.Parameter)`` runs ``_ParameterMeta.__instancecheck__``)
_PASS_THROUGH = ("torch.nn.parameter", "abc", "typing")
# torch itself (torch.fx's machinery, ``nn.Module.__setattr__``, the Python side of operators)
# and fxtap's tracer, which inspect every value they are handed: not the model's own decisions
_INTERNAL = ("torch.", "fxtap.")


def type_read(proxy: Any, frame: Any) -> type:
    """The ``__class__`` of a Proxy of the tracer of this thread's trace, read by the code of
    ``frame``: ``isinstance`` reads it when the Proxy's own type is not the class asked for.

    Asked by the model's code, that is a hazard: the value is a tuple, a dict, a dataclass or a
    tensor when the model runs, and the graph would hold the branch taken for a Proxy. Asked by
    torch.fx or fxtap (which inspect every value they record), it is the Proxy's type.
    """
    own = type(proxy)
    tracer = _STATE.tracer
    if tracer is None or _STATE.internal or proxy.__dict__.get("tracer") is not tracer:
        return own
    module = frame.f_globals.get("__name__", "")
    while module in _PASS_THROUGH and frame.f_back is not None:
        frame = frame.f_back
        module = frame.f_globals.get("__name__", "")
    if module.startswith(_INTERNAL) or module == "torch" or not _inspects_type(frame):
        return own  # e.g. torch's C argument parser, which checks every argument's type for a SymInt
    if _proxy_types.answered_alike(_node_of(proxy), tracer.root, frame):
        tracer.typed_leaves.update(_proxy_types.leaves_relied_on(_node_of(proxy)))  # guarded: a hook added later makes the graph stale
        return own  # ``isinstance(x, list)`` on what is certainly a tensor: False either way
    hazard = Hazard(
        f"checks the type of {_what(proxy)} (isinstance, in {frame.f_code.co_filename}:{frame.f_lineno}), which is a Proxy "
        "while tracing, so a graph would hold the branch taken for a Proxy, not for the value the model sees"
    )
    tracer.found(hazard)
    raise hazard


def _node_of(proxy: Any) -> Any:
    """The node of a Proxy; ``None`` for an attribute of a traced value not recorded yet."""
    return proxy.__dict__.get("_node") if "root" in proxy.__dict__ else proxy.__dict__.get("node")


def _what(proxy: Any) -> str:
    node = _node_of(proxy)
    if node is None:  # an attribute of a traced value, not recorded yet
        return f"the attribute {proxy.__dict__.get('attr')!r} of a traced value"
    if node.op == "call_module":
        return f"the output of {node.target!r}"
    if node.op == "placeholder":
        return f"the input {str(node.target).lstrip('*')!r}"
    return f"a traced value ({node.op} {getattr(node.target, '__name__', node.target)})"


# how a call by position is spelled: PRECALL/CALL (3.11), CALL (3.12 and later; 3.13 pushes a NULL
# with the callable, which LOAD_GLOBAL's stack effect counts), CALL_FUNCTION and CALL_METHOD (3.10); any other
# call (``f(*args)``) is judged from the instructions before it, or taken as a check
_CALLS = frozenset({"PRECALL", "CALL", "CALL_FUNCTION", "CALL_METHOD"})
_KEYWORD_CALLS = frozenset({"CALL_KW", "CALL_FUNCTION_KW"})


def _inspects_type(frame: Any) -> bool:
    """Whether the instruction ``frame`` is at reads a type: a call of ``isinstance`` or
    ``issubclass`` (by any name: ``check = isinstance``, ``builtins.isinstance``, a
    ``functools.partial`` of it), a call of another builtin of Python's (``list(map(isinstance,
    ...))`` checks inside it), or ``x.__class__``. A function of torch called there that checks its
    arguments' types (its C argument parser) is no type check of the model's. When the callable is
    not a plain name or attribute chain, or the bytecode is not understood, it is taken as a type
    check: the caller then runs eagerly, which is always right.
    """
    callee = _callee(frame.f_code, frame.f_lasti)
    if isinstance(callee, bool):
        return callee
    value = _resolve(frame, callee)
    if value is _proxy_types.UNKNOWN:
        return True
    while isinstance(value, functools.partial):
        value = value.func
    if value is builtins.isinstance or value is builtins.issubclass:
        return True
    return getattr(value, "__module__", None) == "builtins"  # a builtin of Python's (``map`` calling ``isinstance``)


def _resolve(frame: Any, chain: tuple[tuple[str, Any], ...]) -> Any:
    """The value of a load chain (``LOAD_GLOBAL builtins``, ``LOAD_ATTR isinstance``) in ``frame``."""
    (opname, name), *attributes = chain
    value = _proxy_types.loaded(frame, opname, name)
    for _, attribute in attributes:
        if value is _proxy_types.UNKNOWN:
            break
        try:
            value = inspect.getattr_static(value, attribute)
        except AttributeError:
            held = [d for d in ("_modules", "_parameters", "_buffers") if attribute in getattr(value, "__dict__", {}).get(d, {})]
            if not isinstance(value, nn.Module) or not held:
                return _proxy_types.UNKNOWN
            value = value.__dict__[held[0]][attribute]  # a submodule, parameter or buffer, as nn.Module.__getattr__ finds it
        if isinstance(value, (staticmethod, classmethod)):
            return _proxy_types.UNKNOWN  # a descriptor: what it gives is not read statically
    return value


_BASE_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST"})
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


@functools.lru_cache(maxsize=4096)
def _callee(code: Any, lasti: int) -> bool | tuple[tuple[str, Any], ...]:
    """What the instruction at ``lasti`` of ``code`` calls, as the load chain of the callable
    (a name, then attributes); ``True`` where it reads a type for sure (``x.__class__``) or is not
    understood, ``False`` where it cannot be a type check (a call with keywords)."""
    instructions = [ins for ins in dis.get_instructions(code) if ins.opname != "CACHE"]
    at = next((i for i, ins in enumerate(instructions) if ins.offset == lasti), None)
    if at is None:
        return True
    call = instructions[at]
    if call.opname == "LOAD_ATTR":
        return call.argval == "__class__"
    if call.opname in _KEYWORD_CALLS:
        return False  # isinstance and issubclass take no keywords
    if call.opname not in _CALLS or call.arg is None:
        return True  # (a specialized PRECALL makes the call itself: lasti is either)
    need = call.arg  # the arguments, pushed after the callable: walk back to the first one's start
    index = at
    while need > 0:
        index -= 1
        if index < 0:
            return True
        ins = instructions[index]
        if ins.opname in _SKIPPED:
            continue
        if ins.is_jump_target or "JUMP" in ins.opname:
            return True
        need -= dis.stack_effect(ins.opcode, ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None, jump=False)
    if need < 0:
        return True  # an instruction pushed more than the arguments: not understood
    return _chain(instructions, index)


_SKIPPED = frozenset({"PRECALL", "KW_NAMES", "NOP", "PUSH_NULL"})


def _chain(instructions: list[Any], first_argument: int) -> bool | tuple[tuple[str, Any], ...]:
    """The load chain (a name, then attributes) that pushed the callable, whose last instruction
    is right before ``first_argument``; ``True`` when the callable is anything else (a call's result)."""
    loads = []
    index = first_argument - 1
    while index >= 0 and instructions[index].opname in _SKIPPED:
        index -= 1
    while index >= 0 and instructions[index].opname in _ATTRIBUTE_LOADS:
        loads.append(instructions[index])
        index -= 1
    if index < 0 or instructions[index].opname not in _BASE_LOADS:
        return True
    loads.append(instructions[index])
    loads.reverse()
    if any(ins.is_jump_target for ins in loads[1:]) or instructions[first_argument].is_jump_target:
        return True
    return tuple((ins.opname, ins.argval) for ins in loads)
