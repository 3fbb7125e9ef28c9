"""The check run on every model of the matrix, shared by test_matrix.py and docs/gen_models.py.

For one model (random weights, eval mode, small input):

1. **Reference.** Every module call's output is cloned in a plain forward hook as the module
   returns (``record_calls``, independent of fxtap), keyed by the call's tap name.
2. **Names.** Picked automatically (``pick``): the first convolution (else the first leaf
   module), the block in the middle of the forward, the last block, every call of every module
   that runs more than once, and up to two functional ops from ``fxtap.names`` (an ``add`` in
   the middle of the graph, and one other op).
3. **Tap.** ``fxtap.tap(model, names, mode="auto")``: module names must equal the hook clones;
   functional-op names must equal the op recomputed eagerly (``recompute``: the op's node is
   looked up in fxtap's trace and applied to its inputs, which come from the hook clones, the
   model's inputs and its parameters); an op whose inputs cannot all be found that way is
   compared with the value it has when tapped alone on a fresh copy of the model.
4. **Model unchanged** (parameters, buffers, modules, modes, hooks, and its own output), and the mode, the FX share and the timings are returned in a ``Result``.
   With ``Case.keep_output``, the model's output returned by the tapped call (a transformers
   ``DynamicCache`` in it, layer by layer) must equal the eager one too, on both calls.

Truth and tap both run under ``torch.no_grad()``: some kernels differ between grad modes.
"""

from __future__ import annotations

import copy
import inspect
import operator
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from .registry import Case
from torch import fx, nn
from .truth import assert_unchanged, model_fingerprint, quiet_fallbacks

import fxtap

# -- the reference ---------------------------------------------------------------------------------------


def clone(value: Any, depth: int = 8) -> Any:
    """A deep snapshot: tensors cloned, containers rebuilt, objects holding tensors (torchvision's
    ImageList, a transformers DynamicCache) copied with their tensors cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if depth == 0:
        return value
    if isinstance(value, tuple):
        items = [clone(v, depth - 1) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [clone(v, depth - 1) for v in value]
    if isinstance(value, Mapping):
        return {k: clone(v, depth - 1) for k, v in value.items()}
    if _is_object(value) and _holds_tensor(value):
        twin = copy.copy(value)
        twin.__dict__.update({k: clone(v, depth - 1) for k, v in vars(value).items()})
        return twin
    return value


def _is_object(value: Any) -> bool:
    return hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type, torch.Tensor))


def _holds_tensor(value: Any, depth: int = 8) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth == 0:
        return False
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v, depth - 1) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth - 1) for v in value.values())
    if _is_object(value):
        return any(_holds_tensor(v, depth - 1) for v in vars(value).values())
    return False


def assert_close(actual: Any, expected: Any, *, atol: float = 0.0, where: str = "") -> None:
    """Equal values in equal structures (exactly when ``atol`` is 0); ``where`` names the spot."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} is not a tensor"
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
            f"{where}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"
        )
        try:
            torch.testing.assert_close(actual.detach(), expected, rtol=0 if not atol else 1e-5, atol=atol, equal_nan=True)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from None
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{where}: {type(actual).__name__} is not a sequence"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, atol=atol, where=f"{where}[{i}]")
        return
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: {type(actual).__name__} is not a mapping"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], atol=atol, where=f"{where}[{key!r}]")
        return
    if _is_object(expected) and _holds_tensor(expected):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert_close(vars(actual), vars(expected), atol=atol, where=where)
        return
    assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def call_name(path: str, index: int, reserved: frozenset[str]) -> str:
    """The tap name of call ``index`` (0-based) of the module at ``path`` (docs/names.md, rules 4
    and 5): ``path``, then ``path_1``, ``path_2``, ... skipping names that a module, parameter or
    buffer already has."""
    if index == 0:
        return path
    free = [f"{path}_{i}" for i in range(1, index + len(reserved) + 2) if f"{path}_{i}" not in reserved]
    return free[index - 1]


def reserved_names(model: nn.Module) -> frozenset[str]:
    paths = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    paths += [n for n, _ in model.named_parameters(remove_duplicate=False)]
    paths += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return frozenset(paths)


@dataclass
class Calls:
    """Every module call of one forward: tap name -> cloned output, and the calls' order."""

    values: dict[str, Any]
    path_of: dict[str, str]  # tap name -> module path
    starts: list[str]  # tap names in the order the calls started
    ends: list[str]  # ... and returned
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]  # first call's cloned inputs, for the paths asked
    output: Any


def record_calls(model: nn.Module, *args: Any, inputs_of: frozenset[str] = frozenset(), **kwargs: Any) -> Calls:
    """Run ``model`` with a forward hook on every module; clone each output as it is returned."""
    reserved = reserved_names(model)
    started: dict[str, int] = {}
    ended: dict[str, int] = {}
    calls = Calls({}, {}, [], [], {}, None)
    handles = []

    def pre(path: str) -> Any:
        def hook(module: nn.Module, hook_args: Any, hook_kwargs: Any) -> None:
            k = started.get(path, 0)
            started[path] = k + 1
            calls.starts.append(call_name(path, k, reserved))
            if path in inputs_of and k == 0:
                calls.inputs[path] = (clone(hook_args), clone(hook_kwargs))

        return hook

    def post(path: str) -> Any:
        def hook(module: nn.Module, hook_args: Any, output: Any) -> None:
            k = ended.get(path, 0)
            ended[path] = k + 1
            name = call_name(path, k, reserved)
            calls.values[name] = clone(output)
            calls.path_of[name] = path
            calls.ends.append(name)

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post(path)))
    try:
        with torch.no_grad():
            calls.output = clone(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return calls


# -- picking names -----------------------------------------------------------------------------------------

_SUFFIX = re.compile(r"_[0-9]+$")
# functional ops whose value recompute() can reproduce by applying the op again
RECOMPUTABLE = frozenset(
    ["add", "sub", "mul", "truediv", "div", "matmul", "bmm", "cat", "stack", "flatten", "mean", "sum", "relu", "gelu", "silu", "sigmoid", "tanh", "softmax", "transpose", "permute", "reshape", "view", "contiguous", "layer_norm", "interpolate", "pad", "neg", "pow", "sqrt", "rsqrt", "exp", "roll", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "linear", "conv2d", "getitem", "chunk", "split", "unsqueeze", "squeeze", "scaled_dot_product_attention", "expand", "clamp", "hardswish", "hardsigmoid"]
)


def op_base(name: str) -> str:
    """``layer1.0.add_1`` -> ``add``; ``relu_fn`` -> ``relu``."""
    leaf = _SUFFIX.sub("", name.rsplit(".", 1)[-1])
    return leaf.removesuffix("_fn")


@dataclass
class Pick:
    names: list[str]  # every picked name, graph order first
    why: dict[str, str]  # name -> why it was picked
    ops: list[str]  # the functional-op names among them


def pick(model: nn.Module, calls: Calls, listed: list[str], extra: tuple[str, ...] = ()) -> Pick:
    """Names spread through the model (see the module docstring), and ``extra`` ones."""
    modules = dict(model.named_modules())
    leaf = {path: next(iter(m.children()), None) is None for path, m in modules.items()}
    why: dict[str, str] = {}

    def add(name: str, reason: str) -> None:
        why[name] = f"{why[name]}, {reason}" if name in why else reason

    leaves = [n for n in calls.starts if leaf[calls.path_of[n]]]
    convs = [n for n in leaves if "Conv" in type(modules[calls.path_of[n]]).__name__]
    if convs or leaves:
        add((convs or leaves)[0], "first conv" if convs else "first module")
    blocks = [n for n in calls.ends if not leaf[calls.path_of[n]]]
    if blocks:
        add(blocks[len(blocks) // 2], "middle block")
        add(blocks[-1], "last block")
    counts: dict[str, int] = {}
    for name in calls.ends:
        counts[calls.path_of[name]] = counts.get(calls.path_of[name], 0) + 1
    for name in calls.ends:
        if counts[calls.path_of[name]] > 1:
            add(name, "called more than once")
    module_names = set(calls.values) | set(modules)
    ops = [n for n in listed if n not in module_names and op_base(n) in RECOMPUTABLE]
    adds = [n for n in ops if op_base(n) == "add"]
    others = [n for n in ops if op_base(n) not in ("add", "getitem")]
    chosen = []
    if adds:
        chosen.append(adds[len(adds) // 2])
    if others:
        chosen.append(others[len(others) // 2])
    for name in chosen:
        add(name, "functional op")
    for name in extra:
        add(name, "named in the registry")
        if name not in module_names and name not in chosen:
            chosen.append(name)
    position = {n: i for i, n in enumerate(listed)}
    names = sorted(why, key=lambda n: (position.get(n, len(position)), calls.ends.index(n) if n in calls.ends else 0))
    return Pick(names, why, chosen)


# -- recomputing a functional op from eager values --------------------------------------------------------


class _Unresolvable(Exception):
    pass


def _locate(model: nn.Module, name: str) -> tuple[Any, str, nn.Module] | None:
    """fxtap's trace that holds the node of ``name``: (Traced, path of the traced module, that module)."""
    from fxtap._capture import locate

    return locate(model, name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _inplace(node: fx.Node) -> bool:
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", "")
    return (
        label.endswith("_") and not label.startswith("_")
        or node.kwargs.get("inplace") is True
        or target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)
    )


def recompute(
    model: nn.Module, name: str, calls: Calls, args: tuple[Any, ...], kwargs: dict[str, Any], depth: int = 12
) -> tuple[Any, str]:
    """The value of functional op ``name``, recomputed eagerly; raises ``_Unresolvable``.

    Returns the value and a description of the recomputation (``add(layer1.0.bn2, maxpool)``).
    """
    located = _locate(model, name)
    if located is None:
        raise _Unresolvable(f"{name!r} is not in any trace fxtap makes")
    traced, prefix, owner = located
    local = name[len(prefix) + 1 :] if prefix else name
    target = traced.points[local].value
    if not isinstance(target, fx.Node):
        raise _Unresolvable(f"{name!r} is not one node")
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    modules: dict[fx.Node, list[Any]] = {}
    for point in traced.points.values():
        if point.kind == "module" and isinstance(point.value, fx.Node):
            modules.setdefault(point.value, []).append(point)
    placeholders = _placeholder_values(traced, prefix, owner, model, calls, args, kwargs)

    def value(node: fx.Node, consumer: fx.Node, left: int) -> tuple[Any, str]:
        known = [p for p in modules.get(node, []) if order[p.moment] < order[consumer]]
        if known:
            point = max(known, key=lambda p: order[p.moment])
            key = _join(prefix, point.name)
            if key in calls.values:
                return clone(calls.values[key]), key
        if node.op == "placeholder":
            if node.name not in placeholders:
                raise _Unresolvable(f"input {node.target!r} of {prefix or 'the model'}")
            return clone(placeholders[node.name]), str(node.target)
        if node.op == "get_attr":  # a parameter, buffer or constant of the traced module
            obj: Any = traced.root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj, str(node.target)
        if node.op in ("call_function", "call_method") and left > 0:
            return apply(node, left - 1)
        raise _Unresolvable(f"{node.op} {node.target}")

    def apply(node: fx.Node, left: int) -> tuple[Any, str]:
        labels: list[str] = []

        def resolve(n: fx.Node) -> Any:
            v, label = value(n, node, left)
            labels.append(label)
            return v

        node_args = fx.node.map_arg(node.args, resolve)
        node_kwargs = fx.node.map_arg(node.kwargs, resolve)
        if _inplace(node):
            node_args = fx.node.map_aggregate(node_args, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)
        if node.op == "call_method":
            result = getattr(node_args[0], str(node.target))(*node_args[1:], **node_kwargs)
        else:
            result = node.target(*node_args, **node_kwargs)
        if node.target is operator.setitem:
            result = node_args[0]
        op = str(node.target) if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
        return result, f"{op}({', '.join(labels)})"

    with torch.no_grad():
        return apply(target, depth)


def _placeholder_values(
    traced: Any, prefix: str, owner: nn.Module, model: nn.Module, calls: Calls, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Values of the trace's inputs: the model's own inputs, or the traced child's recorded call."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if not prefix:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return {n.name: bound.arguments[str(n.target)] for n in placeholders if str(n.target) in bound.arguments}
    if prefix not in calls.inputs:
        return {}
    call_args, call_kwargs = calls.inputs[prefix]
    bound = inspect.signature(owner.forward).bind(*call_args, **call_kwargs)
    required = [
        p.name
        for p in inspect.signature(owner.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return {n.name: bound.arguments[required[i]] for i, n in enumerate(placeholders) if i < len(required)}


# -- the check -------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one model's check measured."""

    case: Case
    names: list[str]
    why: dict[str, str]
    mode: str
    paths: dict[str, str]
    leaf_fx: int  # called leaf modules captured by FX ...
    leaf_total: int  # ... of all called leaf modules
    build_s: float  # fxtap.tap(), plus the graphs built on the first call
    tap_s: float  # fxtap.tap() alone
    ops: dict[str, str] = field(default_factory=dict)  # op name -> how its value was checked
    warnings: list[str] = field(default_factory=list)

    @property
    def fx_names(self) -> int:
        """Names tested that a graph computes: an FX graph, or the torch.export graph (``export``)."""
        return sum(path in ("fx", "export") for path in self.paths.values())


def _tap(model: nn.Module, names: list[str], **options: Any) -> tuple[fxtap.Tapped, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, names, **options)
    fallback = [str(w.message) for w in caught if issubclass(w.category, fxtap.FallbackWarning)]
    other = [w for w in caught if not issubclass(w.category, fxtap.FallbackWarning)]
    for w in other:  # not ours to judge: pass the model's own warnings on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return tapped, fallback


def check(case: Case, *, timings: bool = False) -> Result:
    """Run every check of the module docstring on ``case``; raise AssertionError on a mismatch.

    With ``timings``, the tapped model is called twice, so that the graphs built on the first
    call count towards the build time.
    """
    model = case.build()
    args, kwargs = case.inputs()
    calls = record_calls(model, *args, **kwargs)
    with quiet_fallbacks():
        listed = fxtap.names(model)
    first_calls = {calls.path_of[n] for n in calls.values}
    unlisted = sorted(first_calls - set(listed))
    assert not unlisted, f"fxtap.names() misses modules that the forward calls: {unlisted[:10]}"
    picked = pick(model, calls, listed, case.extra)
    before = model_fingerprint(model)

    start = time.perf_counter()
    tapped, fallback = _tap(model, picked.names, keep_output=case.keep_output)
    tap_s = time.perf_counter() - start
    # mode "fx" may still warn: an opaque submodule can run inside the one graph that computes every name
    assert tapped.mode == "fx" or fallback, f"mode {tapped.mode!r} without a FallbackWarning"
    with torch.no_grad():
        start = time.perf_counter()
        out = tapped(*args, **kwargs)
        first_s = time.perf_counter() - start
        build_s = tap_s
        start = time.perf_counter()
        second = tapped(*args, **kwargs)  # an eagerly running root: the torch.export graph, when it exported
        if timings:
            build_s += max(0.0, first_s - (time.perf_counter() - start))
    for result, which in ((out, "first call"), (second, "second call")):
        assert list(result) == picked.names + ["output"] * case.keep_output
        if case.keep_output:  # the model's own output, a transformers cache in it: a new equal object each call
            assert_close(result["output"], calls.output, atol=case.atol, where=f"{case.name} output ({which})")
        for name in picked.names:
            if name in calls.values:
                where = f"{case.name} {name!r} ({picked.why[name]}, {which})"
                assert_close(result[name], calls.values[name], atol=case.atol, where=where)
        ops = _check_ops(case, model, picked.ops, result, calls, args, kwargs)
    assert_unchanged(before, model)

    with torch.no_grad():
        again = clone(model(*args, **kwargs))
    assert_close(again, calls.output, atol=case.atol, where=f"{case.name}: the model's own output after tapping")

    leaves = [n for n in calls.values if next(iter(model.get_submodule(calls.path_of[n]).children()), None) is None]
    all_leaves, _ = _tap(model, leaves)
    leaf_paths = all_leaves.paths
    assert_unchanged(before, model)
    return Result(
        case, picked.names, picked.why, tapped.mode, tapped.paths,
        sum(p == "fx" for p in leaf_paths.values()), len(leaf_paths), build_s, tap_s, ops, fallback,
    )  # fmt: skip


def _check_ops(
    case: Case, model: nn.Module, names: list[str], out: dict[str, Any], calls: Calls, args: Any, kwargs: Any
) -> dict[str, str]:
    how: dict[str, str] = {}
    pending = []
    for name in names:
        try:
            expected, recipe = recompute(model, name, calls, args, kwargs)
        except _Unresolvable:
            pending.append(name)
            continue
        assert_close(out[name], expected, atol=case.atol, where=f"{case.name} {name!r} = {recipe}")
        how[name] = f"recomputed: {recipe}"
    if pending:  # inputs inside an eagerly run child: record its call's inputs and try again
        prefixes = frozenset(located[1] for name in pending if (located := _locate(model, name)) is not None)
        calls_with_inputs = record_calls(model, *args, inputs_of=prefixes, **kwargs)
        for name in pending:
            try:
                expected, recipe = recompute(model, name, calls_with_inputs, args, kwargs)
                how[name] = f"recomputed: {recipe}"
            except _Unresolvable as why:
                fresh = case.build()
                tapped, _ = _tap(fresh, [name])
                with torch.no_grad():
                    expected = tapped(*args, **kwargs)[name]
                recipe = f"tapped alone on a fresh copy ({why})"
                how[name] = recipe
            assert_close(out[name], expected, atol=case.atol, where=f"{case.name} {name!r} = {recipe}")
    return how


# -- names(model, inputs): exactly what one call produces ---------------------------------------------------


def _batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call as one batch (fxtap.extract's convention): positional arguments, or all by keyword."""
    if not kwargs:
        return tuple(args)
    return {**dict(zip(inspect.signature(model.forward).parameters, args)), **kwargs}


def module_calls(model: nn.Module, names: list[str]) -> set[str]:
    """The names among ``names`` that are module calls (``path`` or ``path_k``)."""
    paths = {path for path, _ in model.named_modules() if path}
    return {n for n in names if n in paths or (_SUFFIX.search(n) is not None and _SUFFIX.sub("", n) in paths)}


def check_names(case: Case, *, with_inputs: bool = True, never_called: set[str] | None = None) -> list[str]:
    """``fxtap.names(model, inputs)`` lists exactly the module calls that the forward makes (and
    functional ops); ``tap`` of all of them returns every one, module calls equal to the hook
    clones; the model is unchanged. Returns the names.

    ``with_inputs=False``: ``fxtap.names(model)`` instead, which may leave out later calls; the
    modules it lists that the call does not make must be exactly ``never_called``, and ``tap``
    of the other names returns every one."""
    model = case.build()
    args, kwargs = case.inputs()
    calls = record_calls(model, *args, **kwargs)
    before = model_fingerprint(model)
    produced = fxtap.names(model, _batch(model, args, kwargs)) if with_inputs else fxtap.names(model)
    assert_unchanged(before, model)
    assert len(set(produced)) == len(produced), f"{case.name}: names(model, inputs) repeats a name"
    made = module_calls(model, produced)
    if with_inputs:
        assert made == set(calls.values), (
            f"{case.name}: module calls not listed: {sorted(set(calls.values) - made)[:10]}; listed, not made: {sorted(made - set(calls.values))[:10]}"
        )
    else:
        assert made - set(calls.values) == (never_called or set()), f"{case.name}: names(model) lists modules no call makes"
        produced = [name for name in produced if name not in (never_called or set())]
    tapped, _ = _tap(model, produced)
    with torch.no_grad():
        out = tapped(*args, **kwargs)
    assert list(out) == produced
    for name in produced:
        if name in calls.values:
            assert_close(out[name], calls.values[name], atol=case.atol, where=f"{case.name} {name!r} (names(model, inputs))")
    assert_unchanged(before, model)
    return produced
