"""``cut()``: the part of a model between named values, as a module of its own; and ``Cut``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from torch import fx, nn

from .._capture import analysis as _analysis
from .._capture import guard as _guard
from .._capture import names as _names
from .._capture.call_spec import default_concrete_args
from .._capture.edit import Apply, as_modules
from .._capture.export import metas_hold, model_guard, tensor_metas
from .._capture.model import unwrap
from .._errors import TapNameError, TraceFailedError
from . import export_cut as _export_cut
from .export_shapes import Shapes
from .graph import split
from .shapes import Evidence

__all__ = ["Cut", "cut"]

# a cut's graph, its argument names, the size checks of a graph from torch.export, and what
# rebuilds the dict when that graph returns tensors only (its outputs hold a transformers cache)
_Built = tuple[fx.GraphModule, list[str], Shapes | None, Callable[[Any], dict[str, Any]] | None]


def cut(
    model: nn.Module,
    inputs: Mapping[str, str] | Sequence[str],
    outputs: Mapping[str, str] | Sequence[str] = ("output",),
    *,
    example: Any = None,
    mode: Literal["auto", "fx"] = "auto",
    edit: Mapping[str, Any] | None = None,
) -> Cut:
    """The part of ``model`` that computes ``outputs`` from the values of ``inputs``, as a module.

    Args:
        model: any ``nn.Module`` that torch.fx can trace, or whose own ``forward`` torch.fx
            cannot trace but torch.export can (a Hugging Face model: pass ``example``); it is
            not changed, and the result shares its parameters and its train/eval mode.
        inputs: tap names (``fxtap.names(model)``) whose values the cut takes, in this order;
            a mapping ``{name: key}`` names the cut's arguments by ``key``.
        outputs: tap names the cut returns (``"output"`` is the model's own output); a mapping
            renames them. By default the model's output.
        example: the model's inputs (a tensor or a tuple of positional arguments; for a model
            torch.fx cannot trace, also a dict of keyword arguments). Required when torch.fx
            cannot trace the model's own ``forward``: the cut is then built from one
            torch.export graph of the model's call at these inputs, each cut input replaced by
            the cut's argument (docs/cut.md, "Models torch.fx cannot trace"). Otherwise optional:
            when the rest of the model reads only the *shape* of a value computed before the cut
            (``x.shape[0]``), the cut takes it from a cut input whose shape equals it at the
            example's batch size and at twice it.
        mode: ``"auto"`` (torch.fx, or torch.export where torch.fx cannot trace the model's own
            ``forward``) or ``"fx"`` (torch.fx only).
        edit: values to replace, as for ``fxtap.edit`` (tap name -> function, tensor or module),
            applied where the cut computes them; an edit of a cut input applies to the value
            given to the cut. An output of an edited name is the value after the edit. On the
            torch.export path (a model torch.fx cannot trace), tensors and modules only.

    Returns:
        A ``Cut``: call it with the inputs' values (positionally, or by key) and any model
        inputs it lists after them in ``Cut.inputs``; it returns ``dict[str, Tensor]`` of outputs.

    Raises:
        CutError: an output needs a value computed before the cut and not from its inputs (a
            skip connection that bypasses the cut); ``.missing`` lists their tap names to add.
            Also: an edit of a value computed before the cut (which the cut never runs).
        TapNameError: a name does not exist, or exists only inside code FX does not enter.
        TraceFailedError: torch.fx cannot trace a submodule (the message names it); or it cannot
            trace the model's own ``forward`` and ``example`` is missing, ``mode="fx"``, an edit is
            a function, the model has user hooks or writes attributes, or torch.export fails too.
        FxtapError: (at a call) a cut built from a torch.export graph gets a size the graph
            holds fixed, or unequal sizes it needs equal.
        ValueError: ``mode`` is not ``"auto"`` or ``"fx"``, or ``inputs`` is empty or repeats a name or key.
        TypeError: an edit is not a callable, a tensor or a module.

    Example:
        >>> import torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(2, 3, 64, 64)
        >>> head = fxtap.cut(model, ["layer3"])  # layer4, avgpool and fc
        >>> features = fxtap.tap(model, ["layer3"])(x)["layer3"]
        >>> torch.equal(head(features)["output"], model(x))
        True
    """
    if mode not in ("auto", "fx"):
        raise ValueError(f'mode must be "auto" or "fx", not {mode!r}')
    request_in = _names.normalize_request(inputs)
    request_out = _names.normalize_request(outputs)
    if "output" in request_in:
        raise ValueError('"output" is the model\'s output, not a value a cut can start from')
    edits = as_modules(edit) if edit else {}
    return Cut(unwrap(model), request_in, request_out, example, edits, mode)


class Cut(nn.Module):
    """The part of a model between named values; built by ``fxtap.cut``.

    ``Cut(*values, **by_key)`` takes the cut inputs' values in order (or by key), then the model
    inputs listed after them in ``inputs``, and returns ``dict[str, Tensor]`` of the outputs.
    One graph is built per train/eval mode of ``model`` (the one it has at call time).

    Attributes:
        model: the user's model (shared, not copied).
        edits: the edit modules (``edit=``), when there are any: their parameters train with the cut.
    """

    def __init__(
        self, model: nn.Module, inputs: dict[str, str], outputs: dict[str, str], example: Any, edits: dict[str, nn.Module] | None = None, mode: str = "auto"
    ) -> None:
        super().__init__()
        self._mode = mode
        self.model = model
        self._edits = dict(edits or {})
        if self._edits:  # submodules, as in a Tapped: their parameters are the cut's
            self.edits = nn.ModuleDict({f"e{i}": module for i, module in enumerate(self._edits.values())})
        self.training = model.training  # the model's own flag decides the graph; no train() call changes it
        self._inputs = inputs
        self._outputs = outputs
        self._example = example
        # per train/eval mode, with the guard of the model it was cut from and its tensors' shapes, dtypes, devices
        self._splits: dict[bool, tuple[_guard.Guard, Any, _Built]] = {}
        self._split()  # errors now, not at the first call

    @property
    def inputs(self) -> list[str]:
        """The argument names, in order: the cut inputs' keys, then the model inputs the rest still reads."""
        return list(self._split()[1])

    @property
    def outputs(self) -> list[str]:
        """The keys of the returned dict, in order."""
        return list(self._outputs.values())

    def graph_module(self) -> fx.GraphModule:
        """The ``torch.fx.GraphModule`` of the current train/eval mode: arguments ``inputs``, returns the dict.

        For a model torch.fx cannot trace, it is the graph cut from torch.export's (aten ops): the
        size and dtype checks are the ``Cut``'s, and when an output holds an object the call makes
        (a transformers cache) it returns the tensors alone, which the ``Cut`` rebuilds it around."""
        return self._split()[0]

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        graph, inputs, shapes, rebuild = self._split()
        if kwargs or len(args) != len(inputs):
            args = _bind(inputs, args, kwargs)
        if shapes is not None:
            shapes.check(args)
        return rebuild(graph(*args)) if rebuild is not None else dict(graph(*args))

    def _split(self) -> _Built:
        training = self.model.training
        entry = self._splits.get(training)
        # a submodule or tensor swapped since, or ``model.to(dtype)``: cut again (torch.compile and torch.export, tracing
        # the cut, guard what they captured themselves, as for tap's graphs)
        if entry is None or (not _guard.tracing_here() and (entry[0].check() != _guard.HOLDS or not metas_hold(entry[1]))):
            edits = list(self._edits.values())
            entry = (model_guard(self.model, edits), tensor_metas(self.model, edits), self._build())
            self._splits[training] = entry
        return entry[2]

    def _build(self) -> _Built:
        model = self.model
        try:
            analysis = _analysis.analyse(model, mode="fx", concrete_args=default_concrete_args(model))
        except TraceFailedError as error:
            if not error.module and self._mode == "auto":  # the root: one torch.export graph of the cut call
                return self._exported(error)
            raise TraceFailedError(
                _untraceable(model, error, self._inputs, self._outputs), module=error.module, module_type=error.module_type, reason=error.reason
            ) from None
        traced = analysis.traced
        assert traced is not None  # mode="fx" raises instead
        unknown = [n for n in [*self._inputs, *self._outputs, *self._edits] if n not in traced.points and n != "output"]
        if unknown:
            message = _names.unknown_name_message(unknown, type(model).__name__, list(traced.points))
            raise TapNameError(message + "\n  A cut starts and ends at values of the FX graph; names inside torch.nn modules are not.")
        evidence = Evidence(traced.root, traced.graph, self._example) if self._example is not None else None
        found = split(traced, self._inputs, self._outputs, evidence, self._edits)
        graph = fx.GraphModule(found.root, found.graph, class_name=f"Cut{type(model).__name__}")
        graph.meta["fxtap_input_names"] = list(found.inputs)
        return graph, list(found.inputs), None, None

    def _exported(self, error: TraceFailedError) -> _Built:
        """The cut of a model whose root FX cannot trace, from one torch.export graph (``export_cut``)."""
        owner = type(self.model).__name__
        functions = [name for name, module in self._edits.items() if isinstance(module, Apply)]
        if functions:
            raise TraceFailedError(
                f"cannot cut {owner} with the function edit(s) {', '.join(map(repr, functions))}: torch.fx cannot trace the forward "
                f"of {owner} itself ({error.reason}), and the cut is one torch.export graph, which would bake in the Python state "
                "a function may read (a closure variable, a global).\n  Edit with a tensor or an nn.Module instead; see docs/cut.md.",
                module="", module_type=owner, reason=error.reason,
            )
        if self._example is None:
            raise TraceFailedError(
                f"cannot cut {owner} without example=: torch.fx cannot trace the forward of {owner} itself ({error.reason}), so the "
                "cut is built from one torch.export graph of the model's call, which needs the model's inputs.\n  Pass them: "
                f"fxtap.cut(model, {list(self._inputs)!r}, ..., example=model_inputs) (a tensor, a tuple of positional "
                "arguments or a dict of keyword arguments); see docs/cut.md, \"Models torch.fx cannot trace\".",
                module="", module_type=owner, reason=error.reason,
            )
        built = _export_cut.build(self.model, self._inputs, self._outputs, self._example, error.reason, self._edits)
        return built.module, built.inputs, built.shapes, built.rebuild

    # -- graphs are a cache: rebuilt after moves, copies, loads and changes of the model ----------
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Cut:
        result = super()._apply(fn, *args, **kwargs)
        self._splits = {}
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_splits"] = {}
        return state


def _untraceable(model: nn.Module, error: TraceFailedError, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """Why a model FX cannot trace cannot be cut, and what to do instead."""
    owner = type(model).__name__
    where = f"submodule {error.module!r} ({error.module_type})" if error.module else f"the forward of {owner} itself"
    wanted = [name for name in outputs if name != "output"]
    patch = "{" + ", ".join(f"{name!r}: value" for name in inputs) + "}"
    run = f"fxtap.tap(model, {wanted!r}, edit={patch})" if wanted else f"fxtap.edit(model, {patch})"
    message = (
        f"cannot cut {owner}: a cut is one torch.fx graph, and torch.fx cannot trace {where}: {error.reason}.\n"
    )
    if not error.module:  # the torch.export frontend captures such a model, but its graph is not cut
        message += (
            f"  fxtap runs {owner} as one torch.export graph for tap, edit and export (docs/fallback.md), but a cut "
            "needs the FX graph's names and in-place facts, which that graph does not carry.\n"
        )
    return message + (
        f"  Instead, compute the outputs from values you have by patching them into the whole model: "
        f"{run}(*model_inputs) (the part before the cut runs too); "
        "or cut a submodule torch.fx traces, or make the code traceable (docs/cut.md)."
    )


def _bind(names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The arguments in ``names`` order, from positional values then keywords."""
    if len(args) > len(names):
        raise TypeError(f"the cut takes {len(names)} inputs ({', '.join(names)}), got {len(args)} positional values")
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"the cut has no input {key!r}; its inputs are {', '.join(map(repr, names))}")
        if key in given:
            raise TypeError(f"the cut got two values for input {key!r}")
        given[key] = value
    absent = [name for name in names if name not in given]
    if absent:
        raise TypeError(f"the cut is missing the input{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))}")
    return tuple(given[name] for name in names)

