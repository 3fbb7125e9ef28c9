"""The tap-name grammar: how graph nodes are named, how requests are read, how close names are found.

Pure string logic, no torch. The rules (documented in docs/names.md):

* A module's output is named by its '.'-separated path (``layer1.0.conv1``); the root's own
  functional ops and inputs have bare names (``flatten``, ``x``).
* A functional op is named ``<scope>.<op>`` where scope is the module whose ``forward`` ran it
  (``layer1.0.add``); in-place arithmetic is named after its operator (``x += y`` -> ``add``).
* Repeated names get ``_1``, ``_2``, ... in graph order, numbered per full name. The bare name is
  the *first* occurrence, for modules and ops alike. A suffix is never one that already names
  a module, parameter or buffer: ``ln_1`` stays the module ``ln_1``. A functional op whose name
  is a module's (``F.relu`` next to a module ``relu``) is named ``relu_fn``, so that module calls
  are numbered by their call count alone and the hook path can name them without seeing ops.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CALL_NUMBER",
    "INPLACE_OPERATORS",
    "Namer",
    "Replay",
    "enclosing",
    "inside",
    "join",
    "module_call_name",
    "normalize_request",
    "split_suffix",
    "suggest",
    "unknown_name_message",
]

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def op_base_name(raw: str) -> str:
    """The base name of a functional op from its function or method name (``add``, ``relu_``)."""
    raw = raw.strip("<>")
    if raw.startswith("__") and raw.endswith("__"):
        raw = raw[2:-2]
    if raw.startswith("i") and raw[1:] in INPLACE_OPERATORS:
        raw = raw[1:]  # ``x += y`` keeps torchvision's name ``add``
    return _CAMEL.sub("_", raw).lower() if not raw.islower() else raw


# Python's augmented-assignment operators: ``operator.iadd`` is ``x += y``
INPLACE_OPERATORS = frozenset(
    {"add", "and", "floordiv", "lshift", "mod", "mul", "matmul", "or", "pow", "rshift", "sub", "truediv", "xor"}
)
_SUFFIX = re.compile(r"^(.+)_([0-9]+)$")
CALL_NUMBER = re.compile(r"_([0-9]+)(?=\.|$)")  # a later-call suffix on any component: ``blk_2.fc``


def split_suffix(name: str) -> tuple[str, int] | None:
    """``("blk", 2)`` for ``"blk_2"``; ``None`` for a name without a ``_k`` suffix."""
    match = _SUFFIX.match(name)
    return (match.group(1), int(match.group(2))) if match is not None else None


def inside(path: str, scope: str, *, strict: bool = False) -> bool:
    """Whether ``path`` lies in ``scope`` ('.'-components; ``""`` holds everything). A path is
    inside itself unless ``strict``."""
    if not scope:
        return not strict or bool(path)
    return path.startswith(scope + ".") or (not strict and path == scope)


def enclosing(path: str, scopes: Iterable[str], *, strict: bool = False, innermost: bool = True) -> str | None:
    """The innermost (or outermost) of ``scopes`` that ``path`` lies in, ``None`` when none does."""
    found = [scope for scope in scopes if inside(path, scope, strict=strict)]
    if not found:
        return None
    return max(found, key=len) if innermost else min(found, key=len)


def join(scope: str, leaf: str) -> str:
    """``scope.leaf``; ``leaf`` at the root, ``scope`` for an empty leaf (the scope itself)."""
    return f"{scope}.{leaf}" if scope and leaf else scope or leaf


class Namer:
    """Hands out unique tap names in graph order.

    Module calls are named from the module path and the call index alone (``module_call_name``),
    so the hook path, which sees module calls but no functional ops, derives the same names.
    Functional ops, inputs and attribute reads take the first free name that no module call can
    ever take; an op named like a module (``F.relu`` beside a module ``relu``) becomes ``relu_fn``.

    Args:
        module_paths: the path of every module of the model.
        other_paths: parameter and buffer paths, which only a read of that attribute may take bare.
    """

    def __init__(self, module_paths: Iterable[str], other_paths: Iterable[str] = ()) -> None:
        self._modules = frozenset(module_paths)
        self._reserved = self._modules | frozenset(other_paths)
        self._used: set[str] = set()

    def module_call(self, path: str, call_index: int) -> str:
        """Name of call ``call_index`` (0-based) of the module at ``path``."""
        name = module_call_name(path, call_index, self._reserved)
        self._used.add(name)
        return name

    def node(self, base: str) -> str:
        """Name of a functional op or input whose natural name is ``base``."""
        if base in self._modules:
            base = f"{base}_fn"
        return self._first_free(base)

    def attribute(self, path: str) -> str:
        """Name of a read of the parameter or buffer at ``path`` (its own path, if still free)."""
        if path not in self._used:
            self._used.add(path)
            return path
        return self._first_free(path)

    def _first_free(self, base: str) -> str:
        candidates = itertools.chain([base], (f"{base}_{i}" for i in itertools.count(1)))
        for name in candidates:
            if name not in self._used and name not in self._reserved and not self._module_call_like(name):
                self._used.add(name)
                return name
        raise AssertionError("unreachable: itertools.count is infinite")

    def _module_call_like(self, name: str) -> bool:
        split = split_suffix(name)
        return split is not None and split[0] in self._modules


class Replay:
    """Names the successive calls of one module traced on its own, as a trace of the whole model would.

    A module traced by itself (its parent's code cannot be traced) names its nodes locally
    (``fc``, ``add``). Fed each call's naming log (``(kind, key, local name)`` in graph order,
    kinds ``module``, ``node``, ``attribute``, ``input``), ``call`` returns the global names of that
    call: ``blk.fc``/``blk.add``/``blk`` for the first, ``blk.fc_1``/``blk.add_1``/``blk_1`` for
    the second. The module's own output is the local name ``""``; inputs have no global name.

    Args:
        path: the module's path in the model.
        module_paths, other_paths: as for ``Namer``, of the whole model.
    """

    def __init__(self, path: str, module_paths: Iterable[str], other_paths: Iterable[str] = ()) -> None:
        self._path = path
        self._namer = Namer(module_paths, other_paths)
        self._calls: dict[str, int] = {}

    def call(self, naming: Sequence[tuple[str, str, str]]) -> dict[str, str]:
        """Local name -> global name for the next call of the module."""
        mapping = {"": self._module_call(self._path)}
        for kind, key, local in naming:
            full = join(self._path, key)
            if kind == "module":
                mapping[local] = self._module_call(full)
            elif kind == "node":
                mapping[local] = self._namer.node(full)
            elif kind == "attribute":
                mapping[local] = self._namer.attribute(full)
        return mapping

    def _module_call(self, path: str) -> str:
        index = self._calls.get(path, 0)
        self._calls[path] = index + 1
        return self._namer.module_call(path, index)


def module_call_name(path: str, call_index: int, reserved: frozenset[str] | set[str]) -> str:
    """``path`` for the first call, then ``path_1``, ``path_2``, ... skipping names in ``reserved``."""
    if call_index == 0:
        return path
    suffixed = (f"{path}_{i}" for i in itertools.count(1))
    free = (name for name in suffixed if name not in reserved)
    return next(itertools.islice(free, call_index - 1, None))


def normalize_request(names: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """Turn a list of names or a ``{name: key}`` mapping into an ordered ``{name: key}`` dict.

    Raises:
        TypeError: ``names`` is a single string, or holds something other than strings.
        ValueError: the request is empty, or repeats a name or an output key.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of names or a mapping, not the string {names!r}; write [{names!r}]")
    pairs = list(names.items()) if isinstance(names, Mapping) else [(n, n) for n in names]
    if not pairs:
        raise ValueError("names is empty: ask for at least one name (list them with fxtap.names(model))")
    for name, key in pairs:
        if not isinstance(name, str) or not isinstance(key, str):
            raise TypeError(f"tap names and output keys must be strings, got {name!r}: {key!r}")
    _reject_repeats([name for name, _ in pairs], "name")
    _reject_repeats([key for _, key in pairs], "output key")
    return dict(pairs)


def _reject_repeats(items: list[str], what: str) -> None:
    seen: set[str] = set()
    repeated = [item for item in items if item in seen or seen.add(item)]  # type: ignore[func-returns-value]
    if repeated:
        raise ValueError(f"duplicate {what}{'s' if len(repeated) > 1 else ''} {', '.join(map(repr, repeated))}: each may appear once")


def suggest(query: str, available: Sequence[str], n: int = 5) -> list[str]:
    """The names in ``available`` closest to ``query``, best first.

    Names that contain every '.'-component of the query in order (``layer2.relu`` ->
    ``layer2.0.relu``) come first, then difflib's closest spellings.
    """
    parts = query.split(".")
    structural = [name for name in available if _contains_in_order(name.split("."), parts)]
    structural.sort(key=lambda name: (len(name.split(".")), available.index(name)))
    fuzzy = difflib.get_close_matches(query, available, n=n, cutoff=0.6)
    out: list[str] = []
    for name in structural[:n] + fuzzy:
        if name not in out and name != query:
            out.append(name)
    return out[:n]


def _contains_in_order(components: list[str], parts: list[str]) -> bool:
    it = iter(components)
    return all(part in it for part in parts) and len(components) > len(parts)


def unknown_name_message(unknown: Sequence[str], owner: str, available: Sequence[str], note: str = "") -> str:
    """The three-part message of a ``TapNameError``: what is wrong, what is close, what to do."""
    lines = [f"no tap named {', '.join(map(repr, unknown))} in {owner}{note}."]
    for name in unknown:
        close = suggest(name, available)
        if close:
            lead = f"Did you mean (for {name!r})" if len(unknown) > 1 else "Did you mean"
            lines.append(f"  {lead}: {', '.join(map(repr, close))}?")
    lines.append("  Tap names are '.'-separated module paths and op names; see docs/names.md.")
    lines.append("  List them with fxtap.names(model).")
    return "\n".join(lines)
