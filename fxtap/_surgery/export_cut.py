"""``fxtap.cut`` on a model only the torch.export frontend captures: the cut from one export graph.

A model whose root torch.fx cannot trace (every Hugging Face model) runs as one torch.export graph
of its *tapped call* for ``tap`` and ``edit`` (``_capture/export.py``). A cut is built the same way:

1. **The call.** ``_CutCall`` takes the cut inputs' values, then the model's tensor arguments, and
   runs the model's tapped call in mixed mode (the tap of the outputs, ``keep_output`` for
   ``"output"``) with an edit at each cut input that *replaces* the value by the given one, as
   ``fxtap.tap(model, outputs, edit={input: value})`` does. The edit calls the op
   ``fxtap::cut_point(value, given)``, which returns (a copy of) ``given``: a node that marks the
   cut's moment in the graph and says which value it replaces.
2. **Export.** Non-strict ``torch.export`` of that call at the example, every dimension dynamic
   where torch.export keeps it so (``Dim.AUTO``: it ties the dimensions that must be equal), then
   ``run_decompositions({})``: the graph is functional, so in-place ops are gone (the caller's
   tensor is never written), each value is the value at its moment, and buffer writes are outputs.
3. **The cut** (``export_graph.cut_graph``): each ``cut_point`` is replaced by its given value, and
   only what the outputs need is kept (see there for the rules: skips, model inputs, shapes,
   buffer writes).

The export runs with the RNG forked, the model's attributes and buffer values kept; the warm-up
call that builds the region graphs runs on copies with buffers put back.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._capture import fx as _fx
from .._capture.export import ExportRunner, _attributes, _quiet, _refusal, _written
from .._capture.masks import eager_shortcuts
from .._capture.model import buffer_values_kept, cuda_devices, preserved
from .._capture.outputs import Outputs, made_before
from .._capture.produced import untouched
from .._errors import CutError, FallbackWarning, TraceFailedError, summary
from .export_graph import Built, Unnamed, cut_graph

__all__ = ["Built", "build"]


@torch.library.custom_op("fxtap::cut_point", mutates_args=())
def _cut_point(value: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """The value a cut input's edit returns: ``given`` (a copy), in place of ``value``."""
    return given.clone()


@_cut_point.register_fake
def _(value: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(given)


class _Box:
    """The values given to the cut while it is exported; one object shared by the edits and their
    twins (a twin copies lists and dicts, not this)."""

    def __init__(self, size: int) -> None:
        self.values: list[Any] = [None] * size


class _Given(nn.Module):
    """The edit at a cut input: the value given to the cut (slot ``index`` of ``box``) replaces it."""

    def __init__(self, name: str, box: _Box, index: int) -> None:
        super().__init__()
        self.name, self._box, self._index = name, box, index

    def forward(self, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise CutError(
                f"cannot cut at {self.name!r}: its value is a {type(value).__name__}, and a cut input must be one tensor. "
                "Cut at the tensors inside it (the modules or ops that compute them) instead."
            )
        return torch.ops.fxtap.cut_point(value, self._box.values[self._index])


class _Then(nn.Module):
    """An edit of a cut input: the given value replaces the model's, then the user's edit applies
    to it (as on the FX path: an edit of a cut input applies to the value given to the cut)."""

    def __init__(self, given: _Given, edit: nn.Module) -> None:
        super().__init__()
        self.given, self.edit = given, edit

    def forward(self, value: Any) -> Any:
        return self.edit(self.given(value))


class _CutCall(nn.Module):
    """The model's tapped call with each cut input replaced by an argument: what is exported.
    ``model`` is a structural twin of the user's (the same tensors, its own dicts: torch.export
    swaps the parameters of what it traces), as for the export frontend's ``_Call``."""

    def __init__(
        self, runner: Any, model: nn.Module, box: _Box, keys: list[str], arguments: tuple[list[Any], pytree.TreeSpec], wanted: int
    ) -> None:
        super().__init__()
        self.model = model  # a submodule: the graph reads the model's own parameters and buffers
        if runner.edits:
            self.edits = nn.ModuleList(runner.edits)
        self.__dict__["_runner"] = runner  # not a submodule
        self._box, self._keys, self._arguments = box, keys, arguments
        self._wanted = set(keys[:wanted])  # the outputs; the other keys only name values (their tensors, if any)

    def forward(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        count = len(self._box.values)
        given, rest = tensors[:count], iter(tensors[count:])
        leaves, spec = self._arguments
        args, kwargs = pytree.tree_unflatten([next(rest) if isinstance(v, torch.Tensor) else v for v in leaves], spec)
        self._box.values = list(given)
        try:
            out = self.__dict__["_runner"]._run(self.model, args, kwargs, stop_early=False)  # mixed mode, the whole forward: the export records it
        finally:
            self._box.values = [None] * count
        # per key, what the graph computes (tensors) and the rest (structure, constants, objects the
        # call made, such as a transformers cache), as the export frontend splits a tapped call's dict
        existing = made_before(self.model, leaves)
        parts: list[tuple[Outputs, int]] = []
        computed: list[Any] = []
        for key in self._keys:
            value = out[key] if key in self._wanted or isinstance(out[key], torch.Tensor) else None  # a name's value: tensors only
            outputs, found = Outputs.split(value, existing)
            parts.append((outputs, len(found)))
            computed += found
        self.__dict__["parts"] = parts  # not a module attribute: torch.export puts those back
        return tuple(computed)


def build(
    model: nn.Module, inputs: dict[str, str], outputs: dict[str, str], example: Any, reason: str, edits: dict[str, nn.Module] | None = None
) -> Built:
    """The cut of ``model`` (FX cannot trace its root: ``reason``) from one torch.export graph of its
    tapped call at ``example``, in the model's current train/eval mode, with ``edits`` (tap name ->
    tensor edit or module) applied where the cut computes the value."""
    edits = dict(edits or {})
    owner = type(model).__name__
    refused = _refusal(model, [])
    if refused:
        raise TraceFailedError(
            f"cannot cut {owner}: torch.fx cannot trace the forward of {owner} itself ({reason}), and its torch.export graph "
            f"would not be the model: {refused}.\n  Remove them while cutting, or cut a submodule torch.fx traces; see docs/cut.md.",
            module="", module_type=owner, reason=reason,
        )
    program, call, tensor_names = _export(model, inputs, outputs, example, reason, [], edits)
    is_tensor = _TensorNames(model, example)
    try:
        return cut_graph(program, call, model, inputs, outputs, tensor_names, is_tensor)
    except Unnamed as unnamed:  # a skip from an op inside a module: export again, tapping that module's ops, to name it
        candidates = _op_names(model, unnamed.modules)
        if not candidates:
            raise
        try:
            program, call, tensor_names = _export(model, inputs, outputs, example, reason, candidates, edits)
        except Exception:  # noqa: BLE001 - only to name the value: say what is known
            raise unnamed from None
        return cut_graph(program, call, model, inputs, outputs, tensor_names, is_tensor, candidates)


class _TensorNames:
    """Whether a tap name's value is one tensor at the example (asked only to name missing values:
    each name costs a call of the model, which changes nothing)."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        self.model, self.example = model, example
        self.known: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        from .._tap import _tapped

        if name not in self.known:
            args, kwargs = _as_call(self.example)
            try:
                with warnings.catch_warnings(), untouched(self.model, args, kwargs):
                    warnings.simplefilter("ignore", FallbackWarning)
                    value = _tapped(self.model, [name], mode="auto", warn=False, detach=True)(*args, **kwargs)[name]
                self.known[name] = isinstance(value, torch.Tensor)
            except Exception:  # noqa: BLE001 - a name that does not tap: not one to suggest
                self.known[name] = False
        return self.known[name]


def _op_names(model: nn.Module, modules: list[str]) -> list[str]:
    """The tap names of ops (not modules) inside ``modules``."""
    from .._tap import names

    paths = {path for path, _ in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        found = names(model)
    return [n for n in found if n not in paths and any(n.startswith(f"{m}.") for m in modules)]


def _export(
    model: nn.Module, inputs: dict[str, str], outputs: dict[str, str], example: Any, reason: str, named: list[str], user_edits: dict[str, nn.Module]
) -> tuple[Any, nn.Module, list[str]]:
    """The functional program of the cut call (``named``: extra taps, to name values), the call, and
    the names of the model's tensor arguments."""
    # the public layer's tap: the cut is the tapped call with edits
    from .._tap import _tapped

    owner = type(model).__name__
    args, kwargs = _as_call(example)
    arguments = pytree.tree_flatten((args, kwargs))
    model_tensors = [leaf for leaf in arguments[0] if isinstance(leaf, torch.Tensor)]
    names = _argument_names(model, args, kwargs)
    box = _Box(len(inputs))
    edits: dict[str, nn.Module] = {name: _Given(name, box, i) for i, name in enumerate(inputs)}
    for name, edit in user_edits.items():  # after the cut inputs' (which they apply to, for a cut input)
        edits[name] = _Then(edits[name], edit) if isinstance(edits.get(name), _Given) else edit  # type: ignore[arg-type]
    wanted = [name for name in outputs if name != "output"]
    request = {name: f"o{i}" for i, name in enumerate(dict.fromkeys([*(wanted or list(inputs)[:1]), *named]))}
    keep_output = "output" in outputs
    keys = [("output" if name == "output" else request[name]) for name in [*outputs, *named]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # the cut says what it does itself
        taps = _tapped(model, list(inputs), mode="auto", warn=False, detach=True)  # unknown names: tap's own message
        tapped = _tapped(model, request, mode="auto", keep_output=keep_output, warn=False, edit=edits)
    devices = cuda_devices([*model_tensors, *model.parameters()])
    try:
        with untouched(model, args, kwargs):
            values = taps(*args, **kwargs)  # the cut inputs' values at the example (their shapes)
            for name in inputs:
                if not isinstance(values[name], torch.Tensor):
                    raise CutError(
                        f"cannot cut at {name!r}: its value is a {type(values[name]).__name__}, and a cut input must be one tensor. "
                        "Cut at the tensors inside it (the modules or ops that compute them) instead."
                    )
            given = [values[name].clone() for name in inputs]
            runner = tapped._runner(tapped._calls.spec(args, kwargs, checked=tapped._spec))
            if not isinstance(runner, ExportRunner):
                raise AssertionError(f"expected {type(model).__name__} to run on the export frontend")  # noqa: TRY004
            twin, twin_runner = runner._twin(model)
            call = _CutCall(twin_runner, twin, box, keys, arguments, len(outputs))
            names_of_edits = {i: next(name for name, m in edits.items() if m is module) for i, module in enumerate(runner.edits)}
            call.__dict__["edit_names"] = {i: name for i, name in names_of_edits.items() if name in user_edits}
            before = _attributes(twin, twin_runner.edits)
            call(*given, *[t.clone() for t in model_tensors])  # builds the twin's region graphs that the export runs
            written = _written(before)
    except CutError:
        raise
    except Exception as error:  # the example does not run: say so
        raise TraceFailedError(
            f"cannot cut {owner}: the model does not run on the example given ({summary(error)}).",
            module="",
            module_type=type(model).__name__,
            reason=reason,
        ) from error
    if written:
        raise TraceFailedError(
            f"cannot cut {owner}: torch.fx cannot trace the forward of {owner} itself ({reason}), and the forward writes the "
            f"attribute {written} (Python-side state that a graph cannot record).\n  Cut a submodule torch.fx traces; see docs/cut.md.",
            module="", module_type=owner, reason=reason,
        )
    flat = (*given, *model_tensors)
    dims = tuple(dict.fromkeys(range(t.dim()), torch.export.Dim.AUTO) for t in flat)
    try:
        with _fx.exclusive(), torch.random.fork_rng(devices=devices), preserved(model), buffer_values_kept(model), _quiet():
            with eager_shortcuts():  # transformers' masks as eager code skips them
                program = torch.export.export(call, flat, dynamic_shapes={"tensors": dims}, strict=False)
            program = program.run_decompositions({})
    except CutError:
        raise
    except Exception as error:  # the one place this path gives up on torch.export
        raise TraceFailedError(
            f"cannot cut {type(model).__name__}: torch.fx cannot trace the forward of {type(model).__name__} itself ({reason}), "
            f"and torch.export of the cut call failed: {summary(error)}.\n"
            "  Cut a submodule torch.fx traces, or patch the value into the whole model: "
            f"fxtap.tap(model, outputs, edit={{{', '.join(repr(n) for n in inputs)}: value}})(*model_inputs); see docs/cut.md.",
            module="",
            module_type=type(model).__name__,
            reason=reason,
        ) from error
    tensor_names = [name for leaf, name in zip(arguments[0], names) if isinstance(leaf, torch.Tensor)]
    return program, call, tensor_names


def _as_call(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example`` as (args, kwargs): a tensor, a tuple of positional arguments, or a dict of keyword arguments."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _argument_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """A name per leaf of ``(args, kwargs)``: the model's parameter names (``args_i`` for ``*args``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in parameters if p.kind == p.VAR_POSITIONAL), "args")
    names: list[str] = []
    for i, value in enumerate(args):
        base = positional[i].name if i < len(positional) else f"{star}_{i - len(positional)}"
        names += _leaf_names(base, value)
    for key, value in kwargs.items():
        names += _leaf_names(key, value)
    return names


def _leaf_names(base: str, value: Any) -> list[str]:
    leaves = pytree.tree_leaves(value)
    if len(leaves) == 1 and leaves[0] is value:
        return [base]
    return [f"{base}_{i}" for i in range(len(leaves))]
