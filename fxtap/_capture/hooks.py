"""The hook path: capture module outputs with forward hooks that live for one call only.

Module call names come from ``_names.module_call_name``, the same function the FX tracer uses,
so both paths name the ``k``-th call of a module alike. Captured values are copied (tensors
cloned, containers rebuilt): a hook cannot know whether a later in-place op will overwrite them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from torch import nn
from torch.utils.hooks import RemovableHandle

from .._values import copy_value
from . import names as _names
from .edit import Patch
from .hazards import mark_fxtap_hook
from .model import ModelPaths

__all__ = ["CallLog", "HookTarget", "Recorder", "alias_hints", "aliases", "capture", "hook_targets", "module_paths", "nearest_module", "unapplied_edits_message"]


class HookTarget(NamedTuple):
    """A requested name as a module call: the module's path and the 0-based call index."""

    name: str
    path: str
    call_index: int


def module_paths(root: nn.Module) -> dict[nn.Module, str]:
    """Each module object of ``root`` with its first path, as torch.fx's ``path_of_module`` gives it."""
    return {module: path for path, module in root.named_modules() if path}


def hook_targets(
    root: nn.Module, names: list[str], paths: ModelPaths | None = None
) -> tuple[dict[str, HookTarget], list[str]]:
    """Split ``names`` into module calls (hookable) and the rest.

    ``paths``: ``root``'s module paths and other attribute paths, when the caller has them.
    """
    if not names:  # the common case of a graph holding every name: no walk over the model
        return {}, []
    if paths is None:
        paths = ModelPaths.of(root)
    module_set = paths.modules - aliases(root).keys()  # a second name of a module is not a name of its calls
    reserved = paths.reserved
    targets: dict[str, HookTarget] = {}
    rest: list[str] = []
    for name in names:
        target = _as_module_call(name, module_set, reserved)
        if target is None:
            rest.append(name)
        else:
            targets[name] = target
    return targets, rest


def _as_module_call(name: str, modules: frozenset[str], reserved: frozenset[str]) -> HookTarget | None:
    if name in modules:
        return HookTarget(name, name, 0)
    split = _names.split_suffix(name)
    if split is None or split[0] not in modules:
        return None
    path, number = split
    for index in range(1, number + 1):  # the suffix skips reserved names, so index <= number
        if _names.module_call_name(path, index, reserved) == name:
            return HookTarget(name, path, index)
    return None


def aliases(root: nn.Module) -> dict[str, str]:
    """Second names of modules (``self.b = self.a``): each such path -> the module's first path.

    A module object has one path for FX (``path_of_module``) and for ``named_modules()``: the
    first. Its calls are named by that path (``a``, ``a_1``), whichever attribute the code used:
    a hook on the module cannot tell ``self.a(x)`` from ``self.b(x)``.
    """
    first = {id(module): path for path, module in root.named_modules() if path}
    return {
        path: first.get(id(module), "")
        for path, module in root.named_modules(remove_duplicate=False)
        if path and first.get(id(module), "") != path
    }


def alias_hints(root: nn.Module, names: list[str]) -> list[str]:
    """For each of ``names`` that is (a later call of) a module's second name, what to tap instead."""
    second = aliases(root)
    hints = []
    for name in names:
        split = _names.split_suffix(name)
        path = name if name in second or split is None else split[0]
        if path in second:
            first = second[path] or "the model itself"
            hints.append(
                f"  {name!r}: {path!r} is the module registered first as {first!r} (one module object under two names). "
                f"fxtap names its calls by that first path, in call order: {first!r}, {first + '_1'!r}, ... (docs/names.md)."
            )
    return hints


def nearest_module(root: nn.Module, name: str) -> str:
    """The longest module path that is a '.'-prefix of ``name`` ("" when none is)."""
    return _names.enclosing(name, (n for n, _ in root.named_modules() if n), strict=True) or ""


class _StopForward(BaseException):
    """Raised by a hook once every requested value is captured; caught by ``capture``.

    A BaseException, so a model's own ``except Exception`` cannot swallow it.
    """


class Recorder:
    """Every tap name that one call produces, in the order produced: what ``fxtap.names(model,
    example_inputs)`` lists (``produced.py``).

    Each source of names reports what it produced through ``add``: a ``CallLog`` given a recorder
    hooks every module of ``paths`` and names every call of them (``path``, ``path_1``, ...), and
    the region graphs add the names of every call they serve. Another source of names produced
    during the call (names of functional ops run by eager code) calls ``add`` the same way.
    """

    def __init__(self, paths: Iterable[str], reserved: frozenset[str]) -> None:
        self.paths = frozenset(paths)  # modules whose every call is named
        self.reserved = reserved  # names a later call's ``_k`` suffix skips
        self.names: dict[str, None] = {}  # an ordered set
        self.sources: dict[str, tuple[str, str]] = {}  # name -> (region path, local name) for names of region graphs
        self.hooked: set[str] = set()  # module calls a forward hook saw

    def add(self, name: str, source: tuple[str, str] | None = None) -> None:
        self.names.setdefault(name, None)
        if source is not None:
            self.sources[name] = source

    def called(self, name: str) -> None:
        """A module call that a forward hook saw."""
        self.add(name)
        self.hooked.add(name)


class CallLog:
    """What one tapped call captured: the protocol between hooks, regions and the runner.

    Attributes:
        values: captured values by tap name (hooks and region graphs both ``add`` here).
        calls: module path -> how many times it ran so far in this call (numbers later calls).
        served: module path -> calls served by its own graph (regions), for error messages.
        thread: the thread of the tapped call; hooks ignore other threads' calls of the model.
    """

    def __init__(
        self,
        targets: dict[str, HookTarget],
        copy: bool,
        stop_when_done: bool,
        extra: int,
        edits: dict[str, tuple[HookTarget, Any]],
        record: Recorder | None = None,
    ) -> None:
        self.values: dict[str, Any] = {}
        self._edits = {(t.path, t.call_index): fn for t, fn in edits.values()}
        self.edited: set[tuple[str, int]] = set()  # (path, call index) of the edits applied
        self.edited_in_graphs: set[str] = set()  # names edited by the graphs of submodules (_regions)
        self.stopped = False  # the forward was cut short once every value was captured
        self.calls: dict[str, int] = {}
        self.served: dict[str, int] = {}  # calls of modules served by their own graph (_regions)
        self._wanted = {(t.path, t.call_index): t.name for t in targets.values()}
        self._copy = copy
        self.record = record  # names every name this call produces (``Recorder``), when given
        self._stop = stop_when_done and record is None  # a recorded call runs to its end
        self._expected = len(self._wanted) + extra
        self.thread = threading.get_ident()

    def add(self, name: str, value: Any) -> None:
        """Store a value captured by other means (a locally traced submodule); may end the forward."""
        self.values[name] = value
        if self.record is not None:
            self.record.add(name)
        if self._stop and len(self.values) == self._expected:
            raise _StopForward

    def hook(self, path: str) -> Callable[[nn.Module, Any, Any], Any]:
        def record(module: nn.Module, args: Any, output: Any) -> Any:
            if threading.get_ident() != self.thread:
                return None  # another thread's call of the same model: not ours
            index = self.calls.get(path, 0)
            self.calls[path] = index + 1
            if self.record is not None:
                self.record.called(_names.module_call_name(path, index, self.record.reserved))
            edit = self._edits.get((path, index))
            if edit is not None:
                self.edited.add((path, index))
                output = edit(output)  # the forward hook's return value replaces the module's output
                if isinstance(edit, Patch):
                    output = copy_value(output)  # never let eager code write into the user's tensor
            name = self._wanted.get((path, index))
            if name is not None:
                self.add(name, copy_value(output) if self._copy else output)
            return output if edit is not None else None

        return mark_fxtap_hook(record)


@contextmanager
def capture(
    root: nn.Module,
    targets: dict[str, HookTarget],
    *,
    copy: bool = True,
    stop_when_done: bool = False,
    extra: int = 0,
    edits: dict[str, tuple[HookTarget, Any]] | None = None,
    record: Recorder | None = None,
) -> Iterator[CallLog]:
    """Hook the modules of ``targets`` for the duration of the ``with`` block.

    ``edits`` (name -> (target, module)): the hook returns ``module(output)`` for that call, so
    the rest of the model sees the replacement; a captured name edited too gets the new value.

    The handles are removed in ``finally``, whatever happens. With ``stop_when_done`` the forward
    is cut short (a private exception, swallowed here) as soon as every target is captured,
    and ``extra`` more values arrived through ``add``. With ``record``, every module of
    ``record.paths`` is hooked too, every call of them is named in it, and the forward runs to its end.
    """
    edits = edits or {}
    paths = {t.path for t in targets.values()} | {t.path for t, _ in edits.values()} | (record.paths if record else set())
    state = CallLog(targets, copy, stop_when_done, extra, edits, record)
    handles: list[RemovableHandle] = []
    try:
        for path in sorted(paths):
            handles.append(root.get_submodule(path).register_forward_hook(state.hook(path)))
        try:
            yield state
        except _StopForward:
            state.stopped = True
    finally:
        for handle in handles:
            handle.remove()


def missing_calls_message(targets: dict[str, HookTarget], state: CallLog, owner: str, more: list[str] | None = None) -> str:
    """What ``targets`` (and the described ``more``) were not produced, and how often their modules ran."""
    missing = [t for name, t in targets.items() if name not in state.values]
    parts = [f"{t.name!r} (call {t.call_index + 1} of {t.path!r}, which ran {state.calls.get(t.path, 0)} time(s))" for t in missing]
    parts += more or []
    never = [t.path for t in missing if state.calls.get(t.path, 0) == 0]
    why = ""
    if never:
        outer = sorted({path.rpartition(".")[0] for path in never if "." in path})
        why = (
            f"\n  {', '.join(map(repr, dict.fromkeys(never)))} never ran as a module in this call: the code around it may use "
            "its parameters without calling it (nn.MultiheadAttention's out_proj), or skip it (a dropout under fused attention, "
            "a branch not taken)."
            + (f" Tap the module around it instead ({', '.join(map(repr, outer))})." if outer else "")
        )
    return (
        f"{owner}: these names were not produced by this call: {', '.join(parts)}.{why}\n"
        "  fxtap.names(model, example_inputs) lists exactly the names that a call with those inputs produces; "
        "fxtap.names(model) lists names that some calls may not produce.\n"
        "  A module's later calls are named path_1, path_2, ...; see docs/names.md."
    )


def unapplied_edits_message(
    edits: dict[str, tuple[HookTarget, Any]], state: CallLog, owner: str, in_graphs: list[str] | None = None
) -> str:
    """Which edits found no call to edit in a forward that ran to its end ("" when none): hook
    edits, and ``in_graphs``, the edits of submodules' own graphs."""
    if state.stopped:
        return ""  # the forward stopped once the taps were captured: later edits had nothing to change
    missing = [t for t, _ in edits.values() if (t.path, t.call_index) not in state.edited]
    parts = [f"{t.name!r} (call {t.call_index + 1} of {t.path!r}, which ran {state.calls.get(t.path, 0)} time(s))" for t in missing]
    parts += [repr(name) for name in in_graphs or [] if name not in state.edited_in_graphs]
    if not parts:
        return ""
    return (
        f"{owner}: these edits found no call to edit in this forward: {', '.join(parts)}.\n"
        "  A forward hook edits a module's output only when the module is called as a module (not its "
        "weights used by another module's code); a module's later calls are named path_1, path_2, ...; see docs/names.md."
    )
