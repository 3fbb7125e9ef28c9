"""``tap()``: the public entry point, and ``Tapped``, the module it returns."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Literal, NamedTuple

import torch
from torch import fx, nn

from ._capture import (
    NO_HINTS,
    Hints,
    Placement,
    Runner,
    analyse,
    build,
    depends_on_arguments,
    describe,
    exclusive,
    listed,
    normalize_request,
    produced,
    unwrap,
)
from ._capture import call_spec as _call
from ._capture import edit_modules
from ._capture.export import ExportRunner
from ._capture.export_edits import edit_refusal
from ._capture.exported import graph_module as exported_graph_module
from ._capture.guard import GraphCache, freeze
from ._capture.guard import of_runner as guard_of
from ._errors import FallbackWarning, FxtapError, TapNameError, TraceFailedError
from ._values import as_call

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
        reduction: the product of the strides along its path (timm's "reduction"), measured
            from how much it grows for a larger input (else input size / feature size); for
            tokens, the patch size whose grid (plus up to 8 extra tokens) gives their number;
            ``None`` when neither gives one integer.
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
    leaf_modules: Sequence[type[nn.Module]] | None = None,
    autowrap_functions: Sequence[Callable[..., Any]] | None = None,
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
        leaf_modules: module classes FX keeps as one step (their insides are hooked), as in
            torchvision's ``tracer_kwargs``: for code FX cannot trace that you know of.
        autowrap_functions: plain Python functions FX records as one call instead of tracing
            through them (``torch.fx.wrap``), as in torchvision's ``tracer_kwargs``: for a
            function that calls ``int()`` or branches on its arguments.
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
        TypeError: ``leaf_modules`` or ``autowrap_functions`` lists something else.

    Example:
        >>> import torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> features = fxtap.tap(model, {"layer2": "c3", "layer4.1.relu_1": "c5"})
        >>> out = features(torch.randn(1, 3, 64, 64))
        >>> {key: tuple(value.shape) for key, value in out.items()}
        {'c3': (1, 128, 8, 8), 'c5': (1, 512, 2, 2)}
    """
    hints = Hints.checked(leaf_modules, autowrap_functions)
    return _tapped(model, names, mode=mode, detach=detach, keep_output=keep_output, hints=hints, edit=edit)


def _tapped(
    model: nn.Module,
    names: Mapping[str, str] | Sequence[str],
    *,
    mode: Mode,
    detach: bool = False,
    keep_output: bool = False,
    warn: bool = True,
    hints: Hints = NO_HINTS,
    edit: Mapping[str, Any] | None = None,
) -> Tapped:
    """``tap()`` for fxtap's own callers: ``warn=False`` when the caller reports fallbacks itself
    (``compare``'s paths column, ``export``'s error)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
    request = normalize_request(names)
    if keep_output and "output" in request.values():
        raise ValueError('the output key "output" is taken by keep_output=True; rename that tap')
    edits = edit_modules(edit) if edit else None
    return Tapped(unwrap(model), request, mode=mode, detach=detach, keep_output=keep_output, warn=warn, hints=hints, edits=edits)


def names(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    train: bool = False,
    mode: Mode = "auto",
    leaf_modules: Sequence[type[nn.Module]] | None = None,
    autowrap_functions: Sequence[Callable[..., Any]] | None = None,
) -> list[str]:
    """Every name ``tap()`` accepts for ``model`` in train or eval mode, in graph order; with
    ``example_inputs``, exactly the names that a call with those inputs produces.

    Without inputs the names are read from the code. Which modules code that runs eagerly (a
    forward FX cannot trace: every Hugging Face model) calls cannot be read from it (a dropout
    that fused attention skips, an embedding the forward does not use, a branch not taken):
    inside a child that FX traces on its own, its graph decides, as for a traced model; a model
    that offers example inputs (``model.dummy_inputs``, as Hugging Face models do) is called once
    with them, as below, and the modules of eager code that call does not make are left out.
    Otherwise every module under that code is listed, and tapping one that is never called
    raises ``MissingCallError``. Names of modules that only hooks can reach follow the FX names;
    later calls of them (``blk_1``) are not listed.

    With ``example_inputs`` the model runs once (without gradients, in the mode ``train`` picks;
    its buffers, the RNG state and its mode are left as they were), and the result is what that
    call produces: the names above that it produced, in the same order, plus the later calls of
    modules and ops (``blk_1``, ``blk.add_1``), each right after the calls before it. So
    ``fxtap.tap(model, fxtap.names(model, x))(x)`` returns a value for every name. In train mode
    the call draws from the current RNG state (and gives it back): seed the RNG alike before
    ``names`` and before the tapped call when a random draw decides what runs.

    Args:
        model: any ``nn.Module``; it is not changed.
        example_inputs: inputs as for one batch of ``fxtap.extract``: a tensor (``model(x)``), a
            tuple or list (``model(*inputs)``) or a dict of keyword arguments (``model(**inputs)``).
        train: list the names of train mode (``if self.training:`` branches, dropout).
        mode: as for ``tap()``.
        leaf_modules: as for ``tap()``; it changes the names.
        autowrap_functions: as for ``tap()``; it changes the names.

    Example:
        >>> import torch, torchvision, fxtap
        >>> fxtap.names(torchvision.models.resnet18())[:6]
        ['x', 'conv1', 'bn1', 'relu', 'maxpool', 'layer1.0.conv1']
        >>> len(fxtap.names(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)))
        85
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
    hints = Hints.checked(leaf_modules, autowrap_functions)
    if example_inputs is None:
        return listed(model, train=train, mode=mode, hints=hints)
    args, kwargs = as_call(example_inputs)
    return produced(model, args, kwargs, train=train, mode=mode, hints=hints)


def _eagerly(build: Callable[..., Runner]) -> Callable[..., Runner]:
    """``build``, run eagerly under torch.compile (tracing must see only the model's own calls).

    ``torch.compiler.disable`` imports torch._dynamo (a second of ``import fxtap``, for every
    command of the CLI): it is applied only once dynamo is imported, which torch.compile does
    before it traces anything."""
    return torch.compiler.disable(build) if "torch._dynamo" in sys.modules else build


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
        warn: bool = True,
        hints: Hints = NO_HINTS,
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
        self._hints = hints
        self._warn = warn  # False: the caller reports fallbacks itself
        self._warned: set[str] = set()  # paths already warned about, once per Tapped
        self._runners: GraphCache[Runner] = GraphCache()  # guarded, bounded: see _capture/guard.py
        self._build_lock = threading.Lock()
        self._calls = _call.CallSpecs(model)
        self._spec = self._checked_spec()  # checks the names now, not at first call
        self._last_spec = self._spec  # what mode, paths and report() describe
        _call.adopt_signature(self, model)  # torch.export reads the model's argument names

    # -- public ------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def training(self) -> bool:
        """The wrapped model's train/eval flag (``model.eval()`` makes it ``False`` here too);
        setting it sets the model's, as ``nn.Module.train`` does."""
        model = self.__dict__.get("_modules", {}).get("model")
        return True if model is None else bool(model.training)

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_modules", {}).get("model")
        if model is not None:  # nn.Module.__init__ sets it before the model is there
            model.training = mode

    @property
    def mode(self) -> str:
        """How the names are captured in the current train/eval mode, for the non-tensor arguments
        of the last call (the defaults before any call): ``"fx"`` (one graph computes them all),
        ``"export"`` (one ``torch.export`` graph of a model FX cannot trace computes them all),
        ``"hooks"`` (nothing could be traced) or ``"mixed"``."""
        return self._last_runner().mode

    @property
    def paths(self) -> dict[str, str]:
        """Each requested name mapped to ``"fx"``, ``"export"`` or ``"hook"`` (for the same call as ``mode``)."""
        runner = self._last_runner()
        return {name: runner.path(name) for name in self._request}

    def report(self) -> str:
        """A table: one row per requested name with its key, path, module type and fallback reason
        (for the same call as ``mode``)."""
        from ._text import table

        runner = self._last_runner()
        rows = [
            [name, key, runner.path(name), runner.placement.module_types.get(name, ""), runner.reason(name)]
            for name, key in self._request.items()
        ]
        return table(["name", "key", "path", "module type", "reason"], rows)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        spec = self._calls.spec(args, kwargs, checked=self._spec)
        runner = self._runner(spec)
        self._last_spec = spec
        return runner.run(self.model, args, kwargs)

    def graph_module(self) -> fx.GraphModule:
        """The ``torch.fx.GraphModule`` that computes every requested value in the current mode.

        It takes the model's inputs (non-tensor arguments at their defaults) and returns the
        same dict as the ``Tapped``: the form to hand to ``torch.export``, ONNX or TorchScript.

        For a model only the torch.export frontend captures (``mode == "export"``: a Hugging Face
        model), it is the graph of the *last call*'s input signature, exported again as
        ``ExportedProgram.module()``: it takes the model's arguments as that call passed them
        (positional and keyword), its non-tensor arguments fixed at that call's values (another
        value raises), tensor sizes dynamic where torch.export kept them so. Call the Tapped
        once with example inputs first.

        Raises:
            FxtapError: some names are captured by hooks, which no graph can hold; the message
                names the untraceable code. For an export-captured model: no call yet, or the
                last call could not be exported (the message says why).
        """
        last = self._last_runner()
        if isinstance(last, ExportRunner):
            return exported_graph_module(last, self.model)
        runner = self._runner(self._spec)
        why = runner.placement.why_no_single_graph()
        if why or runner.graph is None:
            raise FxtapError(f"no single graph computes these taps of {type(self.model).__name__}: {why}")
        return runner.graph

    # -- graphs are a cache: rebuilt after moves, copies and loads -----------------------------
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Tapped:
        result = super()._apply(fn, *args, **kwargs)
        self._runners = GraphCache()  # buffers read by the graph may be new tensor objects now
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = _call.drop_signature(self.__dict__.copy())
        state["_runners"] = GraphCache()
        state["_build_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._build_lock = threading.Lock()
        _call.adopt_signature(self, self.model)

    def _last_runner(self) -> Runner:
        return self._runner(self._last_spec)

    def _placement(self, spec: tuple[tuple[str, Any], ...] | None = None) -> Placement:
        """Where the names are captured for ``spec`` (the last call's, by default)."""
        return self._runner(self._last_spec if spec is None else spec).placement

    def _runner(self, spec: tuple[tuple[str, Any], ...]) -> Runner:
        key = (self.model.training, freeze(spec))
        runner = self._runners.lookup(key)  # None when never built, evicted, or the model changed since
        if runner is None:
            with exclusive(), self._build_lock:  # concurrent first calls build once; fxtap traces one at a time
                runner = self._runners.lookup(key)
                if runner is None:
                    runner = _eagerly(self._build)(dict(spec))
                    self._runners.put(key, runner, guard_of(self.model, runner))
        return runner

    def _build(self, concrete_args: dict[str, Any]) -> Runner:  # called through ``_eagerly``
        note = "" if self._mode_arg != "hooks" else ' (mode="hooks")'
        try:
            runner = build(
                self.model, self._request, mode=self._mode_arg, concrete_args=concrete_args,
                keep_output=self._keep_output, detach=self._detach, note=note, hints=self._hints, edits=self._edits,
            )  # fmt: skip
        except TapNameError as error:
            unknown = getattr(error, "unknown", list(self._request))
            given = ", ".join(f"{k}={v!r}" for k, v in concrete_args.items())
            checked = not getattr(error, "eager_root", False) and given
            where = f"\n  (checked with the arguments {given}; names that exist only for other values are not known here)" if checked else ""
            raise TapNameError(f"{error}{where}{self._other_mode_hint(unknown)}") from None
        self._warn_fallbacks(runner.placement.fallbacks, runner.placement)
        return runner

    def _checked_spec(self) -> tuple[tuple[str, Any], ...]:
        """The argument spec the names are checked with: the defaults, or else the defaults with
        every ``None`` argument a graph input (a name may exist only when an optional argument is
        given: ``if y is not None``).

        When neither has the names but the graph depends on the value of a non-tensor argument
        (``if scale != 1.0``), the names may exist for other values: they are checked per call.
        """
        default = self._calls.default
        try:
            self._runner(default)
            return default
        except TapNameError:
            if not default or self._mode_arg == "hooks":
                raise
            # optional arguments (default None) become graph inputs; flags keep their defaults
            given = tuple((name, value) for name, value in default if value is not None)
            try:
                self._runner(given)
            except (TapNameError, TraceFailedError):
                pass
            else:
                return given
            analysis = analyse(self.model, mode=self._mode_arg, concrete_args=dict(default), hints=self._hints)
            if not depends_on_arguments(analysis):
                raise
            self._warn_fallbacks(analysis.fallbacks, None)  # now, not at the call
            return default

    def _other_mode_hint(self, unknown: list[str]) -> str:
        """A hint when the unknown names exist with the model in the other train/eval mode."""
        training = self.model.training
        other = {info.name for info in describe(self.model, train=not training, mode=self._mode_arg, hints=self._hints)}
        found = [name for name in unknown if name in other]
        if not found:
            return ""
        mode, call = ("train", ".train()") if not training else ("eval", ".eval()")
        return f"\n  {', '.join(map(repr, found))} exist(s) in {mode} mode only: call {call} on the model or the Tapped first."

    # -- the only place fxtap warns ----------------------------------------------------------------
    def _warn_fallbacks(self, fallbacks: dict[str, tuple[str, str]], placement: Placement | None) -> None:
        if self._mode_arg != "auto" or not self._warn:
            return
        if "" in fallbacks:
            if "" not in self._warned:
                self._warned.add("")
                _warn(_eager_root_message(fallbacks, placement, len(self._request)))
            return
        for path, (module_type, reason) in fallbacks.items():
            if path not in self._warned:
                self._warned.add(path)
                _warn(_opaque_message(path, module_type, reason))


_SILENCE = "See Tapped.report(); silence with mode=\"hooks\" or warnings.filterwarnings('ignore', category=fxtap.FallbackWarning)."


def _eager_root_message(fallbacks: dict[str, tuple[str, str]], placement: Placement | None, requested: int) -> str:
    """One warning for a model whose own forward runs eagerly, listing what else could not be traced."""
    root_type, reason = fallbacks[""]
    others = "".join(f"\n    {path!r} ({kind}): {why}" for path, (kind, why) in fallbacks.items() if path)
    traced = len(placement.fx) if placement is not None else 0
    did = f"the model runs eagerly; {traced} of {requested} requested names come from submodules traced on their own"
    did += ", the others from forward hooks" if traced < requested else ""
    if requested == 0 and placement is not None:  # fxtap.edit: edits only
        graphs, hooked = len(placement.edits.fx), len(placement.edits.hooks)
        did = f"the model runs eagerly; {graphs} of {graphs + hooked} edits are applied in graphs of submodules traced on their own"
        did += ", the others by forward hooks" if hooked else ""
    refused = edit_refusal(placement) if placement is not None else ""
    if placement is not None and (requested or placement.edits.fx or placement.edits.hooks) and not refused:
        did += (
            ". After the first call with each input signature, fxtap exports that call with torch.export (non-strict)"
            " and runs it as one graph, same names and values; .mode is \"export\" then, or .report() says why not"
        )
    elif refused:
        did += f"; {refused}"
    return (
        f"fxtap: torch.fx cannot trace the forward of {root_type} itself: {reason}"
        + (f"\n  Also untraceable:{others}" if others else "")
        + f"\n  What fxtap did: {did}. {_SILENCE}"
    )


def _opaque_message(path: str, module_type: str, reason: str) -> str:
    where = f"submodule {path!r} ({module_type})" if path else f"the forward of {module_type} itself"
    did = (
        f"{path!r} now runs as one opaque step inside the graph and names inside it are captured with forward hooks"
        if path
        else "the model runs eagerly and names are captured with forward hooks"
    )
    return f"fxtap: torch.fx cannot trace {where}: {reason}\n  What fxtap did: {did}. {_SILENCE}"


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_INTERNAL = (_PACKAGE + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _warn(message: str) -> None:
    """Warn with a ``FallbackWarning`` at the user's line: the first frame outside fxtap and torch
    (``tap()``, ``backbone()``, ``export()``, ``compare()`` or a first call through ``Module.__call__``)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, FallbackWarning, stacklevel=level)
