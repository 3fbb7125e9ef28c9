"""``compare()``: every path that can capture each name, and the truth, run on one input.

The truth is taken without fxtap's pruning, copies or hook plumbing:

* a module call (``layer1``, ``blk_1``): a clone of what the module returned, taken by a plain
  forward hook while the model runs eagerly, as a user would;
* any other name (a functional op, an input, a parameter read): the model's traced graph run
  in full, node by node (``torch.fx.Interpreter``), with a clone taken right after the node of
  that name ran. Names in code that runs eagerly (an untraceable root) have no such truth.
  That graph is itself checked against the eager model: its output must equal the eager
  output, or every such name is reported as a mismatch (the trace missed something the eager
  code does, so it cannot be the truth).

Every run starts from the same state: torch's and Python's global RNGs are reset (dropout draws
the same masks on every path), buffers are restored afterwards (train-mode batch norm), and each run gets
its own copy of the inputs (a model that writes into its input cannot change the next run).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ._capture import HookTarget, analyse, hook_targets, normalize_request, realize, unwrap
from ._capture.model import cuda_devices
from ._errors import MissingCallError
from ._tap import Tapped, _tapped, tap
from ._values import copy_value, detach_value, holds_tensor

__all__ = ["Comparison", "ComparisonRow", "compare"]


class ComparisonRow(NamedTuple):
    """One requested name: what it is, which paths can capture it, and how far apart they are."""

    name: str
    shape: Any  # a tensor's shape as a tuple; for a tuple/dict value, the shapes of its tensors
    dtype: str  # "float32"; several joined by ", " for a container
    fx: bool  # a graph captures it (its path in tap()'s default mode="auto" is "fx")
    hooks: bool  # a forward hook can capture it (it is a module call)
    fx_vs_hooks: float | None  # max abs difference between the two paths; None unless both can
    vs_truth: float | None  # the largest max abs difference of any path from the truth; None without truth
    ok: bool  # every comparison made for this name is within the tolerance


@dataclass(frozen=True)
class Comparison:
    """The result of ``fxtap.compare``: one row per requested name, in request order.

    ``str()`` is a table; ``comparison["layer1"]`` is the row of that name.
    """

    rows: tuple[ComparisonRow, ...]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        """Whether every path agrees with every other and with the truth, for every name."""
        return all(row.ok for row in self.rows)

    def __getitem__(self, name: str) -> ComparisonRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __str__(self) -> str:
        from ._text import table

        rows = [
            [r.name, _shape_text(r.shape), r.dtype, _paths_text(r), _diff_text(r.fx_vs_hooks), _diff_text(r.vs_truth), "ok" if r.ok else "MISMATCH"]
            for r in self.rows
        ]
        agree = sum(row.ok for row in self.rows)
        summary = f"{agree} of {len(self.rows)} names agree within rtol={self.rtol:g}, atol={self.atol:g}"
        return table(["name", "shape", "dtype", "paths", "fx vs hooks", "vs truth", "ok"], rows) + "\n" + summary


def compare(
    model: nn.Module, names: Mapping[str, str] | Sequence[str], *args: Any, rtol: float = 1.3e-6, atol: float = 1e-5, **kwargs: Any
) -> Comparison:
    """Run the FX path, the hook path and the truth on one input, and compare them name by name.

    Use it to check a model before trusting either path: the FX path (``tap()`` where the code
    traces), forward hooks (``mode="hooks"``, module calls only), and the truth (a plain hook's
    clone for a module call; the full, unpruned graph run node by node for other names).

    Args:
        model: any ``nn.Module``. It is left as it was: buffers (batch norm statistics) and the
            global RNG state are restored after every run.
        names: tap names (see ``fxtap.names(model)``), or a mapping whose keys are tap names.
        *args: the model's positional inputs; ``**kwargs`` its keyword inputs.
        rtol: relative tolerance, as in ``torch.isclose`` (the defaults are those of
            ``torch.testing.assert_close`` for float32).
        atol: absolute tolerance.

    Returns:
        A ``Comparison``: ``.ok``, ``.rows`` (one ``ComparisonRow`` per name) and a table as ``str()``.

    Raises:
        TapNameError: a name exists on no path.
        MissingCallError: a requested module call did not happen for this input.

    Example:
        >>> import torch, fxtap
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True)).eval()
        >>> result = fxtap.compare(model, ["0", "1"], torch.randn(2, 4))
        >>> result.ok, result["0"].fx, result["0"].hooks, result["0"].vs_truth
        (True, True, True, 0.0)
    """
    model = unwrap(model)
    request = list(normalize_request(names))
    default = _quiet_tap(model, request)  # raises TapNameError for names no path has
    calls, _ = hook_targets(model, request)
    run = _Isolated(model, args, kwargs)
    by_default = _produced(run, request, lambda some: default if some == request else _quiet_tap(model, some))
    by_hooks = _produced(run, list(calls), lambda some: tap(model, some, mode="hooks", detach=True)) if calls else {}
    missing = [name for name in request if name not in by_default and name not in by_hooks]
    if missing:
        raise MissingCallError(f"{type(model).__name__}: no path produced {', '.join(map(repr, missing))} for this input.")
    truth = run(lambda a, k: _hook_truth(model, calls, a, k))
    eager_output = truth.pop(_OUTPUT)
    others = [name for name in request if name not in calls]
    if others:
        from_graph = run(lambda a, k: _graph_truth(model, others, a, k))
        graph_output = from_graph.pop(_OUTPUT, _ABSENT)
        if graph_output is not _ABSENT and not _close(graph_output, eager_output, rtol, atol):
            from_graph = {name: _UNTRUSTED for name in others}  # the graph is not the model: no truth from it
        truth.update(from_graph)
    paths = default.paths
    rows = [_row(name, paths[name] in ("fx", "export"), name in calls, by_default, by_hooks, truth, rtol, atol) for name in request]
    return Comparison(tuple(rows), rtol, atol)


def _quiet_tap(model: nn.Module, names: list[str]) -> Tapped:
    return _tapped(model, names, mode="auto", detach=True, warn=False)  # the paths column says what falls back


def _produced(run: _Isolated, names: list[str], make: Callable[[list[str]], Tapped]) -> dict[str, Any]:
    """The values of ``names`` one path produces; names whose module call did not happen are left out."""
    try:
        return run(lambda a, k: make(names)(*a, **k))
    except MissingCallError:
        if len(names) == 1:
            return {}
        return {name: value for one in names for name, value in _produced(run, [one], make).items()}


# -- the truth -----------------------------------------------------------------------------------------
def _hook_truth(model: nn.Module, calls: dict[str, HookTarget], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Module calls: clones taken by plain forward hooks during an ordinary forward."""
    wanted = {(t.path, t.call_index): name for name, t in calls.items()}
    counts: dict[str, int] = {}
    out: dict[str, Any] = {}

    def hook_for(path: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            index = counts.get(path, 0)
            counts[path] = index + 1
            if (path, index) in wanted:
                out[wanted[(path, index)]] = detach_value(copy_value(output))

        return hook

    handles = [model.get_submodule(path).register_forward_hook(hook_for(path)) for path in {t.path for t in calls.values()}]
    try:
        out[_OUTPUT] = detach_value(copy_value(model(*args, **kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    return out


class _Snapshots(fx.Interpreter):
    """Runs a traced graph in full and clones each wanted value right after its moment."""

    def __init__(self, traced: Any, names: list[str]) -> None:
        super().__init__(traced.root, garbage_collect_values=False, graph=traced.graph)
        self.points: dict[fx.Node, list[Any]] = {}
        for name in names:
            if name in traced.points:
                self.points.setdefault(traced.points[name].moment, []).append(traced.points[name])
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.env[n] = result
        for point in self.points.get(n, []):
            value = realize(fx.node.map_arg(point.value, lambda node: self.env[node]))
            self.values[point.name] = detach_value(copy_value(value))
        return result


def _graph_truth(model: nn.Module, names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Other names: the whole traced graph of this call, run node by node (none if it does not trace)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    params = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    concrete = {key: value for key, value in bound.arguments.items() if not holds_tensor(value)}
    analysis = analyse(model, mode="auto", concrete_args=concrete)
    if analysis.traced is None:
        return {}
    interpreter = _Snapshots(analysis.traced, names)
    output = interpreter.run(*[bound.arguments[p.name] for p in params])
    return {**interpreter.values, _OUTPUT: detach_value(copy_value(_plain(output)))}


def _plain(value: Any) -> Any:
    """A graph's output with torch.fx's immutable containers made plain (as the eager model's)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


# -- every run from the same state ---------------------------------------------------------------------
class _Isolated:
    """Calls ``fn(args, kwargs)`` with fresh input copies, the same RNG state and restored buffers."""

    def __init__(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        tensors = [*pytree.tree_leaves((args, kwargs)), *model.parameters(), *model.buffers()]
        self.devices = cuda_devices(tensors)

    def __call__(self, fn: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        python_rng = random.getstate()  # Python's RNG too: some forwards draw from it (stochastic depth)
        try:
            with _restored_buffers(self.model), torch.random.fork_rng(devices=self.devices):
                return fn(copy_value(self.args), copy_value(self.kwargs))
        finally:
            random.setstate(python_rng)


@contextmanager
def _restored_buffers(model: nn.Module) -> Iterator[None]:
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved and buffer.shape == saved[name].shape:
                    buffer.copy_(saved[name])


# -- rows ----------------------------------------------------------------------------------------------
def _row(
    name: str, fx_path: bool, hookable: bool, by_default: dict[str, Any], by_hooks: dict[str, Any], truth: dict[str, Any], rtol: float, atol: float
) -> ComparisonRow:
    # None: the path (or the truth) does not exist for this name; _ABSENT: it exists, but this
    # call did not produce the name (the eager model did not make a call the graph holds, say).
    value = by_default.get(name, _ABSENT)  # what tap() returns: the graph's value, or a hook's in a leaf
    hooks = by_hooks.get(name, _ABSENT) if hookable else None
    reference = truth.get(name, _ABSENT if hookable else None)  # every module call has an eager truth
    produced = [v for v in (value, hooks) if v is not None]
    checks = [(value, hooks)] if fx_path and hookable else []
    checks += [(v, reference) for v in produced] if reference is not None else []
    ok = all(_close(a, b, rtol, atol) for a, b in checks)
    fx_vs_hooks = _max_diff(value, hooks) if fx_path and hookable else None
    vs_truth = max(_max_diff(v, reference) for v in produced) if reference is not None else None
    shape, dtype = _describe(next((v for v in (reference, value, hooks) if v is not None and v is not _ABSENT and v is not _UNTRUSTED), None))
    return ComparisonRow(name, shape, dtype, fx_path, hookable, fx_vs_hooks, vs_truth, ok)


_ABSENT: Any = object()
_UNTRUSTED: Any = object()  # the truth of a name from a graph whose output differs from the eager model's: never close
_OUTPUT = "\0output"  # the model's own output among the truth values (no tap name starts with NUL)


def _pairs(a: Any, b: Any) -> list[tuple[Any, Any]] | None:
    """Leaf pairs of two values of the same structure (None when the structures differ)."""
    if a is _ABSENT or b is _ABSENT:
        return None
    leaves_a, spec_a = pytree.tree_flatten(_opened(a))
    leaves_b, spec_b = pytree.tree_flatten(_opened(b))
    return list(zip(leaves_a, leaves_b, strict=True)) if spec_a == spec_b else None


def _opened(value: Any) -> Any:
    """``value`` with each dataclass instance opened into its class and its fields: pytree keeps a
    dataclass whole, and ``==`` on one compares its tensors (ambiguous for more than one element)."""

    def leaf(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return (type(item), {f.name: _opened(getattr(item, f.name)) for f in dataclasses.fields(item)})
        return item

    return pytree.tree_map(leaf, value)


def _max_diff(a: Any, b: Any) -> float:
    pairs = _pairs(a, b)
    if pairs is None:
        return math.inf
    worst = 0.0
    for x, y in pairs:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return math.inf
            if x.numel():
                x, y = _wide(x), _wide(y)
                diff = torch.where(torch.isnan(x) & torch.isnan(y), 0, (x - y).abs())
                worst = max(worst, float(diff.max()))
        elif not _same_leaf(x, y):
            return math.inf
    return worst


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    pairs = _pairs(a, b)
    if pairs is None:
        return False
    for x, y in pairs:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not torch.isclose(_wide(x), _wide(y), rtol=rtol, atol=atol, equal_nan=True).all():
                return False
        elif not _same_leaf(x, y):
            return False
    return True


def _same_leaf(x: Any, y: Any) -> bool:
    """Two leaves that are not both tensors: equal non-tensor values (an int, None)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False
    return x is y or bool(x == y)


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def _describe(value: Any) -> tuple[Any, str]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    tensors = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        return None, type(value).__name__
    dtypes = dict.fromkeys(str(t.dtype).removeprefix("torch.") for t in tensors)
    return tuple(tuple(t.shape) for t in tensors), ", ".join(dtypes)


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], tuple):
        return " ".join(_shape_text(s) for s in shape)
    return "(" + ", ".join(map(str, shape)) + ")"


def _paths_text(row: ComparisonRow) -> str:
    return ", ".join(path for path, possible in (("fx", row.fx), ("hooks", row.hooks)) if possible) or "-"


def _diff_text(diff: float | None) -> str:
    if diff is None:
        return "-"
    return "0" if diff == 0 else f"{diff:.2e}"
