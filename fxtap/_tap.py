"""``tap()``: the public entry point, and ``Tapped``, the module it returns."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import fx, nn

from ._capture import analysis as _analysis
from ._capture import call_spec as _call
from ._capture import describe
from ._capture import fx as _fx
from ._capture import names as _names
from ._capture import placement as _plan
from ._capture import regions as _regions
from ._capture.edit import as_modules as _edit_modules
from ._capture.edit_placement import from_regions as _edits_in_regions
from ._capture.edit_placement import place as _place_edits
from ._capture.model import unwrap
from ._capture.runner import Runner as _Runner
from ._errors import (
    FallbackWarning,
    FxtapError,
    TapNameError,
    TraceFailedError,
)

__all__ = ["FeatureInfo", "Mode", "Tapped", "names", "tap"]

Mode = Literal["auto", "fx", "hooks"]
_MODES = ("auto", "fx", "hooks")


class FeatureInfo(NamedTuple):
    """One output of a ``backbone``: where it comes from and what it looks like.

    Attributes:
        key: its key in the output dict.
        name: the tap name it was requested by.
        channels: the size of its channel dimension (dim 1 of ``(N, C, H, W)``, the last dim of
            ``(N, H, W, C)`` and of tokens ``(N, L, C)``).
        reduction: input size / feature size along the spatial dims (timm's "reduction"); for
            tokens, the patch size whose grid (plus up to 8 extra tokens) gives their number;
            ``None`` when the value has no spatial dims or they do not divide the input's.
        shape: its shape for the example input.
    """

    key: str
    name: str
    channels: int
    reduction: int | None
    shape: tuple[int, ...]


def tap(
    model: nn.Module,
    names: Mapping[str, str] | Sequence[str],
    *,
    mode: Mode = "auto",
    detach: bool = False,
    keep_output: bool = False,
    edit: Mapping[str, Any] | None = None,
) -> Tapped:
    """Wrap ``model`` so that calling it returns the requested intermediate values.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``d model is unwrapped). It is not changed:
            the result shares its parameters, modules and train/eval mode.
        names: tap names (see ``fxtap.names(model)`` and docs/names.md), or a mapping
            ``{name: output_key}`` to rename them.
        mode: ``"fx"`` traces the model with torch.fx and never falls back; ``"hooks"`` uses
            forward hooks only; ``"auto"`` traces and hands only untraceable code to hooks.
        detach: return detached tensors (by default gradients flow through them).
        keep_output: also return the model's own output, under the key ``"output"``.
        edit: values to replace while tapping, as for ``fxtap.edit`` (tap name -> function,
            tensor or module). A tap of an edited name returns the value after the edit, and
            taps downstream of an edit see the edited value.

    Returns:
        A ``Tapped`` module; calling it with the model's inputs returns ``dict[str, Tensor]``
        in the requested order.

    Raises:
        TapNameError: a name does not exist; the message lists the closest ones.
        TraceFailedError: ``mode="fx"`` and the model cannot be traced.
        ValueError: ``names`` is empty or repeats a name or key, or ``mode`` is unknown.

    Example:
        >>> import torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> features = fxtap.tap(model, {"layer2": "c3", "layer4.1.relu_1": "c5"})
        >>> out = features(torch.randn(1, 3, 64, 64))
        >>> {key: tuple(value.shape) for key, value in out.items()}
        {'c3': (1, 128, 8, 8), 'c5': (1, 512, 2, 2)}
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
    request = _names.normalize_request(names)
    if keep_output and "output" in request.values():
        raise ValueError('the output key "output" is taken by keep_output=True; rename that tap')
    edits = _edit_modules(edit) if edit else None
    return Tapped(unwrap(model), request, mode=mode, detach=detach, keep_output=keep_output, edits=edits)


def names(model: nn.Module, *, train: bool = False, mode: Mode = "auto") -> list[str]:
    """Every name ``tap()`` accepts for ``model`` in train or eval mode, in graph order.

    Names of modules that only hooks can reach (inside untraceable code) follow the FX names.
    Later calls of such a module (``blk_1``) are known only once the model runs.

    Example:
        >>> import torchvision, fxtap
        >>> fxtap.names(torchvision.models.resnet18())[:6]
        ['x', 'conv1', 'bn1', 'relu', 'maxpool', 'layer1.0.conv1']
    """
    return [info.name for info in describe(model, train=train, mode=mode)]


class Tapped(nn.Module):
    """A model wrapped to return intermediate values; built by ``fxtap.tap``.

    ``Tapped(*args, **kwargs)`` passes every input to the model and returns ``dict[str, Any]``.
    The wrapped model is ``.model``; its train/eval mode selects the graph that runs. Graphs are
    built per mode and per non-tensor argument values (``return_dict=False``), on first use.

    Attributes:
        model: the wrapped model (the user's object, shared, not copied).
        feature_info: for a ``Tapped`` made by ``fxtap.backbone``, one ``FeatureInfo`` per output
            (key, channels, reduction, shape); ``None`` otherwise.
    """

    feature_info: list[FeatureInfo] | None = None

    def __init__(
        self,
        model: nn.Module,
        request: dict[str, str],
        *,
        mode: Mode,
        detach: bool,
        keep_output: bool,
        edits: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self._edits = dict(edits or {})
        if self._edits:  # submodules: their parameters train with the Tapped (the model's stay shared)
            self.edits = nn.ModuleDict({f"e{i}": module for i, module in enumerate(self._edits.values())})
        self._request = request
        self._mode_arg: Mode = mode
        self._detach = detach
        self._keep_output = keep_output
        self._warned: set[str] = set()
        self._runners: dict[Hashable, _Runner] = {}
        self._default_spec = _call.default_spec(model)
        params = _call.parameters(model)
        # how many tensors a call passes positionally when it leaves every default alone (-1: unknown)
        self._required = sum(1 for p in params if p.default is p.empty and p.kind != p.KEYWORD_ONLY) if _call.plain(params) else -1
        self._spec = self._checked_spec(stacklevel=6)  # checks the names now, not at first call
        self._last_spec = self._spec  # what mode, paths and report() describe

    # -- public ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """How the names are captured in the current train/eval mode, for the non-tensor arguments
        of the last call (the defaults before any call): ``"fx"`` (one graph computes them all),
        ``"hooks"`` (nothing could be traced) or ``"mixed"``."""
        runner = self._runner(self._last_spec, stacklevel=4)
        if runner.graph is not None and not runner.assignment.hooks:
            return "fx"
        return "mixed" if runner.assignment.fx else "hooks"

    @property
    def paths(self) -> dict[str, str]:
        """Each requested name mapped to ``"fx"`` or ``"hook"`` (for the same call as ``mode``)."""
        assignment = self._runner(self._last_spec, stacklevel=4).assignment
        return {name: "fx" if name in assignment.fx else "hook" for name in self._request}

    def report(self) -> str:
        """A table: one row per requested name with its key, path, module type and fallback reason
        (for the same call as ``mode``)."""
        from ._text import table

        assignment = self._runner(self._last_spec, stacklevel=4).assignment
        rows = [
            [name, key, "fx" if name in assignment.fx else "hook", assignment.module_types.get(name, ""), assignment.reasons.get(name, "")]
            for name, key in self._request.items()
        ]
        return table(["name", "key", "path", "module type", "reason"], rows)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Under torch.compile/torch.export, keep Python-side dispatch trivial: default arguments.
        if torch.compiler.is_compiling():
            return self._runner(self._spec, stacklevel=6).run(self.model, args, kwargs)
        if self._plain_call(args, kwargs):
            spec = self._spec  # the common call, tensors for the required arguments: no signature binding
        else:
            spec = _call.call_spec(self.model, args, kwargs)
        runner = self._runner(spec, stacklevel=6)
        self._last_spec = spec
        return runner.run(self.model, args, kwargs)

    def _plain_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return (
            not kwargs
            and self._spec == self._default_spec
            and len(args) == self._required
            and all(isinstance(a, torch.Tensor) for a in args)
        )

    def graph_module(self) -> fx.GraphModule:
        """The ``torch.fx.GraphModule`` that computes every requested value in the current mode.

        It takes the model's inputs (non-tensor arguments at their defaults) and returns the
        same dict as the ``Tapped``: the form to hand to ``torch.export``, ONNX or TorchScript.

        Raises:
            FxtapError: some names are captured by hooks, which no graph can hold; the message
                names the untraceable code.
        """
        runner = self._runner(self._spec, stacklevel=4)
        if runner.graph is None:
            raise FxtapError(
                f"no single graph computes these taps of {type(self.model).__name__}: its own forward cannot be traced, "
                "so it runs eagerly (see Tapped.report()).\n  Tap a traceable submodule instead: "
                "fxtap.tap(model.get_submodule(path), names), or make the forward traceable (docs/fallback.md)."
            )
        if runner.assignment.hooks or runner.edits.hooks:
            hooked = {name: runner.assignment.reasons[name] for name in runner.assignment.hooks}
            hooked.update({name: runner.edits.reasons[name] for name in runner.edits.hooks})
            detail = "; ".join(f"{name!r}: {reason}" for name, reason in hooked.items())
            raise FxtapError(
                f"no single graph computes these taps of {type(self.model).__name__}: some are captured by hooks ({detail}).\n"
                "  Hooks cannot be exported. Tap names outside that code, or make it traceable (docs/fallback.md)."
            )
        return runner.graph

    # -- graphs are a cache: rebuilt after moves, copies and loads -----------------------------
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Tapped:
        result = super()._apply(fn, *args, **kwargs)
        self._runners = {}  # buffers read by the graph may be new tensor objects now
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_runners"] = {}
        return state

    def _runner(self, spec: tuple[tuple[str, Any], ...], *, stacklevel: int) -> _Runner:
        key = (self.model.training, spec)
        runner = self._runners.get(key)
        if runner is None:
            with _fx.gc_paused():  # building allocates a few objects per node: see gc_paused
                runner = self._build(dict(spec), stacklevel=stacklevel + 1)
            self._runners[key] = runner
        return runner

    def _checked_spec(self, *, stacklevel: int) -> tuple[tuple[str, Any], ...]:
        """The argument spec the names are checked with: the defaults, or else the defaults with
        every ``None`` argument a graph input (a name may exist only when an optional argument is
        given: ``if y is not None``).

        When neither has the names but the graph depends on the value of a non-tensor argument
        (``if scale != 1.0``), the names may exist for other values: they are checked per call.
        """
        try:
            self._runner(self._default_spec, stacklevel=stacklevel)
            return self._default_spec
        except TapNameError:
            if not self._default_spec or self._mode_arg == "hooks":
                raise
            # optional arguments (default None) become graph inputs; flags keep their defaults
            given = tuple((name, value) for name, value in self._default_spec if value is not None)
            try:
                self._runner(given, stacklevel=stacklevel)
            except (TapNameError, TraceFailedError):
                pass
            else:
                return given
            analysis = _analysis.analyse(self.model, mode=self._mode_arg, concrete_args=dict(self._default_spec))
            if not _call.depends_on_arguments(analysis):
                raise
            self._warn_fallbacks(analysis, _plan.Assignment({}, {}, {}, {}, {}), stacklevel - 1)  # now, not at the call
            return self._default_spec

    def _build(self, concrete_args: dict[str, Any], *, stacklevel: int) -> _Runner:
        analysis = _analysis.analyse(self.model, mode=self._mode_arg, concrete_args=concrete_args)
        if analysis.traced is None and self._mode_arg == "auto":
            return self._build_eager(analysis, stacklevel=stacklevel + 1)
        note = "" if self._mode_arg != "hooks" else ' (mode="hooks")'
        try:
            assignment = _plan.assign(analysis, self._request, mode=self._mode_arg, note=note)
        except TapNameError as error:
            unknown = [name for name in self._request if name not in set(analysis.names())]
            given = ", ".join(f"{k}={v!r}" for k, v in concrete_args.items())
            where = f"\n  (checked with the arguments {given}; names that exist only for other values are not known here)" if given else ""
            raise TapNameError(f"{error}{where}{self._other_mode_hint(unknown)}") from None
        edits = _place_edits(analysis, self._edits, mode=self._mode_arg)
        self._warn_fallbacks(analysis, assignment, stacklevel)
        graph = None
        if analysis.traced is not None and self._mode_arg != "hooks":
            leaves = frozenset(assignment.leaves.values())
            graph = _fx.build(
                analysis.traced, assignment.fx, keep_output=self._keep_output, detach=self._detach, run_modules=leaves, edits=edits.fx
            )
        return _Runner(graph, assignment, self._request, keep_output=self._keep_output, detach=self._detach, edits=edits)

    def _build_eager(self, analysis: _analysis.Analysis, *, stacklevel: int) -> _Runner:
        """The root runs eagerly; traceable children holding requested names are traced on their own."""
        found = _regions.resolve(self.model, list(self._request) + [n for n in self._edits if n not in self._request], analysis.fallbacks[""])
        edits = _edits_in_regions(found, self._edits, self._request)
        if found.unknown:
            available = found.available + [p for p, _ in self.model.named_modules() if p and p not in found.available]
            message = _names.unknown_name_message(found.unknown, type(self.model).__name__, available)
            raise TapNameError(f"{message}{self._other_mode_hint(found.unknown)}")
        reasons = {name: "" for name in found.fx}
        types = dict(found.fx)
        for name, target in found.hooks.items():
            owner = max((p for p in found.fallbacks if not p or target.path.startswith(p + ".") or target.path == p), key=len)
            reasons[name] = found.fallbacks[owner][1]
            types[name] = type(self.model.get_submodule(target.path)).__name__
        fx_keys = {name: self._request[name] for name in found.fx if name in self._request}
        assignment = _plan.Assignment(fx_keys, found.hooks, reasons, types, {})
        self._warn_fallbacks(_analysis.Analysis(self.model, None, found.fallbacks), assignment, stacklevel)
        return _Runner(
            None, assignment, self._request, keep_output=self._keep_output, detach=self._detach, regions=found.regions, edits=edits
        )

    def _warn_eager(self, fallbacks: dict[str, tuple[str, str]], assignment: _plan.Assignment, stacklevel: int) -> None:
        """One warning for a model whose own forward runs eagerly, listing what else could not be traced."""
        if "" in self._warned:
            return
        self._warned.add("")
        root_type, reason = fallbacks[""]
        others = "".join(f"\n    {path!r} ({kind}): {why}" for path, (kind, why) in fallbacks.items() if path)
        traced = sorted({name for name in assignment.fx})
        did = f"the model runs eagerly; {len(traced)} of {len(self._request)} requested names come from submodules traced on their own"
        did += ", the others from forward hooks" if len(traced) < len(self._request) else ""
        warnings.warn(
            f"fxtap: torch.fx cannot trace the forward of {root_type} itself: {reason}"
            + (f"\n  Also untraceable:{others}" if others else "")
            + f"\n  What fxtap did: {did}. See Tapped.report(); silence with mode=\"hooks\" or "
            "warnings.filterwarnings('ignore', category=fxtap.FallbackWarning).",
            FallbackWarning,
            stacklevel=stacklevel,
        )

    def _other_mode_hint(self, unknown: list[str]) -> str:
        """A hint when the unknown names exist with the model in the other train/eval mode."""
        training = self.model.training
        other = set(names(self.model, train=not training, mode=self._mode_arg))
        found = [name for name in unknown if name in other]
        if not found:
            return ""
        mode, call = ("train", ".train()") if not training else ("eval", ".eval()")
        return f"\n  {', '.join(map(repr, found))} exist(s) in {mode} mode only: call {call} on the model or the Tapped first."

    def _warn_fallbacks(self, analysis: _analysis.Analysis, assignment: _plan.Assignment, stacklevel: int) -> None:
        if self._mode_arg != "auto":
            return
        if "" in analysis.fallbacks:
            self._warn_eager(analysis.fallbacks, assignment, stacklevel + 1)
            return
        for path, (module_type, reason) in analysis.fallbacks.items():
            if path in self._warned:
                continue
            self._warned.add(path)
            where = f"submodule {path!r} ({module_type})" if path else f"the forward of {module_type} itself"
            did = (
                f"{path!r} now runs as one opaque step inside the graph and names inside it are captured with forward hooks"
                if path
                else "the model runs eagerly and names are captured with forward hooks"
            )
            warnings.warn(
                f"fxtap: torch.fx cannot trace {where}: {reason}\n  What fxtap did: {did}. "
                "See Tapped.report(); silence with mode=\"hooks\" or warnings.filterwarnings('ignore', category=fxtap.FallbackWarning).",
                FallbackWarning,
                stacklevel=stacklevel,
            )
