"""``backbone``: a ``Tapped`` with ``feature_info`` (channels, reduction and shape of each output)."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from .._capture.model import training_mode, unwrap
from .._capture.names import normalize_request
from .._errors import TapNameError
from .._tap import FeatureInfo, Mode, Tapped, tap
from .._tap import names as _names
from .verify import as_args as _as_args

__all__ = ["FeatureInfo", "backbone"]


def backbone(model: nn.Module, names: Mapping[str, str] | Sequence[str], example_input: Any, *, mode: Mode = "auto") -> Tapped:
    """``tap(model, names)`` with ``feature_info``: channels, reduction and shape of each output.

    Args:
        model: any ``nn.Module``; it is not changed (the example runs in eval mode, without
            gradients, and the model's train/eval flags are restored).
        names: tap names, or ``{name: output key}``, as for ``fxtap.tap``. For a module that
            returns a list or tuple of tensors, ``"<name>.<i>"`` (where that is no tap name
            of its own) is its element ``i``.
        example_input: one input, or a tuple of the model's positional arguments; its spatial
            size should be a multiple of the largest reduction.
        mode: as for ``fxtap.tap``.

    Returns:
        The ``Tapped``, with ``feature_info``: a list of ``FeatureInfo``, one per output, in
        output order. A 4-D output is read as ``(N, C, H, W)`` when its last two dims divide the
        input's by one factor, else as ``(N, H, W, C)`` (torchvision's Swin).

    Raises:
        TypeError: an output is not a tensor (for a list or tuple of tensors, the message names
            its elements ``"<name>.<i>"`` to pick instead).
        TapNameError: a name does not exist (nor names an element of a list or tuple output).

    Example:
        >>> import torch, torchvision, fxtap
        >>> model = torchvision.models.resnet18().eval()
        >>> features = fxtap.backbone(model, {"layer2": "c3", "layer4": "c5"}, torch.randn(1, 3, 64, 64))
        >>> [(f.key, f.channels, f.reduction) for f in features.feature_info]
        [('c3', 128, 8), ('c5', 512, 32)]
    """
    request = normalize_request(names)
    tapped, picks = _tapped_with_picks(model, request, mode)
    args = _as_args(example_input)
    with torch.no_grad(), training_mode(tapped.model, False):
        out = tapped(*args)
        info = [_feature_info(key, name, value, args) for (key, value), name in zip(out.items(), picks)]
        if any(len(f.shape) == 4 for f in info):
            info = _strided(tapped, args, out, info)
    tapped.feature_info = info
    return tapped


# -- elements of a module's list or tuple output: ``features.1.0`` ----------------------------------
class _Picked(Tapped):
    """A ``Tapped`` whose outputs may be elements of a module's list or tuple output: timm's
    ``selecsls42b`` blocks return ``[out, skip]``, and ``features.1.0`` is ``features.1``'s first."""

    def __init__(self, model: nn.Module, request: dict[str, str], picks: list[tuple[str, str, int | None, str]], mode: Mode) -> None:
        super().__init__(model, request, mode=mode, detach=False, keep_output=False)
        self._picks = picks  # (output key, key of the tapped value, element index or None, requested name)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = super().forward(*args, **kwargs)
        return {key: out[source] if index is None else _element(out[source], index, name) for key, source, index, name in self._picks}

    def graph_module(self) -> fx.GraphModule:
        """The graph of ``Tapped.graph_module``, returning the picked elements."""
        graph = super().graph_module()
        new = fx.Graph()
        old = new.graph_copy(graph.graph, {})
        assert isinstance(old, dict), f"expected a dict output, got {type(old).__name__}"
        outputs = {}
        for key, source, index, _ in self._picks:
            value = old[source]
            if index is not None:
                value = value[index] if isinstance(value, (list, tuple)) else new.call_function(operator.getitem, (value, index))
            outputs[key] = value
        new.output(outputs)
        return fx.GraphModule(graph, new, class_name=type(graph).__name__)


def _tapped_with_picks(model: nn.Module, request: dict[str, str], mode: Mode) -> tuple[Tapped, list[str]]:
    """``tap(model, request)``, or, when that finds no name ``a.b.<i>``, a ``_Picked`` taking element
    ``i`` of ``a.b``'s list or tuple output. Also returns the name of each output."""
    try:
        return tap(model, request, mode=mode), list(request)
    except TapNameError as error:
        known = set(_names(model, train=model.training, mode=mode))
        parents = {name: None if name in known else _split_index(name) for name in request}
        if not any(p is not None and p[0] in known for p in parents.values()):
            raise
        underlying: dict[str, str] = {}  # tapped name -> its key in the inner Tapped
        picks: list[tuple[str, str, int | None, str]] = []
        for name, key in request.items():
            source, index = parents[name] or (name, None)
            underlying.setdefault(source, key if index is None else f"{source}[{index}]")
            picks.append((key, underlying[source], index, name))
        try:
            picked = _Picked(unwrap(model), {n: k for n, k in underlying.items()}, picks, mode)
        except TapNameError:
            raise error from None
        return picked, list(request)


def _element(value: Any, index: int, name: str) -> Any:
    parent = name.rpartition(".")[0]
    if not isinstance(value, (list, tuple)):
        raise TapNameError(f"no tap named {name!r}: {parent!r} returns a {type(value).__name__}, not a list or tuple to pick element {index} of")
    if index >= len(value):
        raise TapNameError(
            f"no tap named {name!r}: {parent!r} returns a {type(value).__name__} of {len(value)} values; "
            f"pick {parent}.0 to {parent}.{len(value) - 1}"
        )
    return value[index]


def _split_index(name: str) -> tuple[str, int] | None:
    parent, _, last = name.rpartition(".")
    return (parent, int(last)) if parent and last.isdigit() else None


# -- feature_info ----------------------------------------------------------------------------------
def _feature_info(key: str, name: str, value: Any, args: tuple[Any, ...]) -> FeatureInfo:
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        shapes = ", ".join(f"{name}.{i}: {tuple(v.shape)}" for i, v in enumerate(value))
        raise TypeError(
            f"backbone outputs must be tensors; {name!r} (key {key!r}) returns a {type(value).__name__} of {len(value)} tensors "
            f"({shapes}).\n  Pick one by name: fxtap.backbone(model, [{name + '.0'!r}, ...]); see docs/export.md."
        )
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"backbone outputs must be tensors; {name!r} (key {key!r}) is a {type(value).__name__}")
    shape = tuple(value.shape)
    image = next((a for a in args if isinstance(a, torch.Tensor)), None)
    spatial = tuple(image.shape[2:]) if image is not None else ()
    channels, reduction = _layout(shape, spatial)
    return FeatureInfo(key, name, channels, reduction, shape)


_GROWTH = 128  # pixels added per spatial dim to measure strides: a multiple of every stride up to 128


def _strided(tapped: Tapped, args: tuple[Any, ...], out: dict[str, Any], info: list[FeatureInfo]) -> list[FeatureInfo]:
    """Reductions of the 4-D outputs from the strides along their path, as timm reports them:
    an input ``_GROWTH`` pixels larger per spatial dim makes each output grow by
    ``_GROWTH / stride`` per dim, whatever the padding (the size ratio is not an integer for
    timm's inception_v3, and is a wrong integer for valid convolutions: 30 -> 14 -> 6 is a
    ratio of 5 for a stride of 4). Where the model refuses that input, or an output does not
    grow by one stride in every dim, the size ratio stays."""
    index = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 4), None)
    if index is None:
        return info
    image = args[index]
    larger = torch.nn.functional.pad(image, (0, _GROWTH, 0, _GROWTH))
    try:
        grown = tapped(*args[:index], larger, *args[index + 1 :])
    except Exception:  # noqa: BLE001 - a model fixed to its input size: keep what the ratio gave
        return info
    result = []
    for f, (key, value) in zip(info, out.items()):
        after = grown.get(key)
        if len(f.shape) == 4 and isinstance(after, torch.Tensor) and after.dim() == 4:
            stride = _stride(tuple(value.shape), tuple(after.shape))
            if stride is not None:
                f = f._replace(reduction=stride, channels=_channels(tuple(value.shape), tuple(after.shape), f.channels))
        result.append(f)
    return result


def _stride(before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    for dims in ((slice(2, 4), 1), (slice(1, 3), 3)):  # (N, C, H, W) first, then (N, H, W, C)
        spatial, channel = dims
        if before[channel] != after[channel]:
            continue
        growth = {a - b for a, b in zip(after[spatial], before[spatial])}
        if len(growth) == 1 and (g := growth.pop()) > 0 and _GROWTH % g == 0:
            return _GROWTH // g
    return None


def _channels(before: tuple[int, ...], after: tuple[int, ...], guess: int) -> int:
    """The channel dim is the one that did not grow: dim 1 unless only the last one stayed."""
    if before[1] == after[1] or before[-1] != after[-1]:
        return guess
    return before[-1]


def _layout(shape: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[int, int | None]:
    """``(channels, reduction)`` of a value of ``shape`` for an input of spatial size ``spatial``."""
    if len(shape) < 2:
        return (shape[0] if shape else 1), None
    if spatial and len(shape) == len(spatial) + 2:
        for channels, dims in ((shape[1], shape[2:]), (shape[-1], shape[1:-1])):  # (N, C, ...) first, then (N, ..., C)
            factor = _common_factor(spatial, dims)
            if factor is not None:
                return channels, factor
        return shape[1], None
    if len(shape) == 3 and len(spatial) == 2:
        return shape[-1], _patch_size(spatial, shape[1])
    return shape[1], None


def _common_factor(spatial: tuple[int, ...], dims: tuple[int, ...]) -> int | None:
    if any(d <= 0 or s % d for s, d in zip(spatial, dims)):
        return None
    factors = {s // d for s, d in zip(spatial, dims)}
    return factors.pop() if len(factors) == 1 else None


def _patch_size(spatial: tuple[int, ...], tokens: int) -> int | None:
    """The patch size whose grid over ``spatial`` gives ``tokens`` tokens, counting up to 8 extra ones (class, register)."""
    height, width = spatial
    for size in range(1, math.gcd(height, width) + 1):
        if height % size == 0 and width % size == 0 and 0 <= tokens - (height // size) * (width // size) <= 8:
            return size
    return None
