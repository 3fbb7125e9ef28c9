"""Pooling a batch of tapped values to one row per example, for ``fxtap.extract``.

A value's layout is read from its shape and the input's spatial size, as ``fxtap.backbone`` reads
it: ``(N, C, H, W, ...)`` (channels first), ``(N, H, W, C)`` (channels last: torchvision's Swin,
ConvNeXt blocks), ``(N, L, C)`` (tokens) or ``(N, C)`` (already a vector). Pooling averages (or
takes the maximum) over the dims that are neither the batch nor the channels, so a channels-last
map gives C numbers per example, not H.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch

from ._deploy.backbone import _layout
from ._errors import FxtapError

__all__ = ["POOLS", "Pool", "Pooled", "layout", "pool", "pool_of"]

Pool = Literal["avg", "max", "cls", "mean_tokens", "none"] | Callable[[torch.Tensor], torch.Tensor]

POOLS = ("avg", "max", "cls", "mean_tokens", "none")


class Pooled(NamedTuple):
    """One pooled batch and how it was pooled (what the manifest records)."""

    value: torch.Tensor
    layout: str  # "channels_first", "channels_last", "tokens", "vector" or "scalar"
    dims: list[int]  # the dims of the tapped value that were reduced (batch dim 0 never is)


def pool_of(name: str, pool: Pool | Mapping[str, Pool]) -> Pool:
    """The pooling of ``name`` from one pooling for every name or a ``{name: pooling}`` mapping."""
    how = pool.get(name, "avg") if isinstance(pool, Mapping) else pool
    if not callable(how) and how not in POOLS:
        raise FxtapError(f"unknown pooling {how!r} for {name!r}: use one of {', '.join(POOLS)}, or a function of the tensor")
    return how


def describe(how: Pool) -> str:
    """The pooling as the manifest records it: its name, or the function's qualified name."""
    return how if isinstance(how, str) else f"callable:{getattr(how, '__module__', '?')}.{getattr(how, '__qualname__', type(how).__name__)}"


def layout(shape: tuple[int, ...], spatial: tuple[int, ...]) -> str:
    """The layout of a value of ``shape`` for an input of spatial size ``spatial`` (``()`` when
    the input has none, e.g. token ids)."""
    if len(shape) < 2:
        return "scalar"
    if len(shape) == 2:
        return "vector"
    if spatial and len(shape) == len(spatial) + 2:
        channels, _ = _layout(shape, spatial)
        return "channels_first" if channels == shape[1] else "channels_last"
    if len(shape) == 3:
        return "tokens"
    return "channels_first"


def pool(name: str, value: Any, how: Pool, *, spatial: tuple[int, ...] = (), mask: torch.Tensor | None = None) -> Pooled:
    """``value`` (one batch of ``name``) pooled by ``how``.

    Raises:
        FxtapError: the value is not a tensor, or the pooling does not apply to its layout.
    """
    if not isinstance(value, torch.Tensor):
        raise FxtapError(
            f"{name!r} is a {type(value).__name__}, not a tensor: extract saves tensors only; "
            "tap the op that picks the tensor you want (e.g. its getitem)"
        )
    tensor = value.detach()
    kind = layout(tuple(tensor.shape), spatial)
    if callable(how):
        return Pooled(how(tensor), kind, [])
    dims = _reduced_dims(kind, tensor.ndim)
    if how == "none" or not dims:
        return Pooled(tensor, kind, [])
    if how in ("cls", "mean_tokens") and kind != "tokens":
        raise FxtapError(f"pooling {how!r} needs tokens (N, L, C), and {name!r} has shape {tuple(tensor.shape)} ({kind}): pool it with 'avg' or 'max'")
    if how == "cls":
        return Pooled(tensor[:, 0], kind, [1])
    wide = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()  # sums of bf16/fp16 lose digits
    if how == "max":
        return Pooled(wide.amax(dim=dims).to(tensor.dtype) if tensor.is_floating_point() else tensor.amax(dim=dims), kind, dims)
    if how == "mean_tokens" and mask is not None and mask.shape == tensor.shape[:2]:
        weights = mask.to(device=wide.device, dtype=wide.dtype).unsqueeze(-1)
        pooled = (wide * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return Pooled(pooled.to(tensor.dtype) if tensor.is_floating_point() else pooled, kind, [1])
    mean = wide.mean(dim=dims)
    return Pooled(mean.to(tensor.dtype) if tensor.is_floating_point() else mean, kind, dims)


def _reduced_dims(kind: str, ndim: int) -> list[int]:
    if kind == "channels_first":
        return list(range(2, ndim))
    if kind == "channels_last":
        return list(range(1, ndim - 1))
    if kind == "tokens":
        return [1]
    return []
