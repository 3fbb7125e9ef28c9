"""``fxtap.extract``: the tapped features of every batch of an iterable, pooled, written to disk in
resumable shards (the format is ``fxtap._features``'s).

This module is the entry: the arguments, checked and recorded (``_job``), and the run under
torchrun. How the data is walked, batch by batch into shards, is ``fxtap._shards``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _features, _ranks
from ._errors import FxtapError
from ._pool import Pool, describe, pool_of
from ._shards import (
    BatchFailedError,
    Job,
    Split,
    plan,
    planned,
    run_planned,
    run_stream,
)
from ._tap import Tapped, tap

__all__ = ["BatchFailedError", "Interrupted", "Summary", "extract", "plan", "run"]


class Summary(NamedTuple):
    """What ``fxtap.extract`` did. ``manifest`` is ``None`` on torchrun ranks other than 0."""

    out: Path
    manifest: dict[str, Any] | None  # the contents of manifest.json
    computed: int  # shards computed by this run (all ranks)
    reused: int  # finished shards kept from an earlier run


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``extract``: every finished shard is on disk; the same call resumes."""

    def __init__(self, out: Path, finished: int, total: int | None) -> None:
        super().__init__(f"interrupted: {finished} shards of {total if total is not None else '?'} finished in {out}")
        self.out, self.finished, self.total = out, finished, total


def extract(
    model: nn.Module,
    names: Sequence[str] | Mapping[str, str] | None,
    batches: Iterable[Any],
    out: str | os.PathLike[str],
    *,
    pool: Pool | Mapping[str, Pool] = "avg",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    out_dtype: torch.dtype | str | None = None,
    shard_size: int = 256,
    progress: bool = True,
    resume: bool = True,
    ids: Split | None = None,
    keys: Sequence[Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Summary:
    """Tap ``names`` of ``model`` on every batch of ``batches``, pool, and write the rows to ``out``.

    Args:
        model: the model (in eval mode), or a ``Tapped`` from ``fxtap.tap``.
        names: tap names (a list, or ``{name: key}``); ``None`` with a ``Tapped``: all of its outputs.
        batches: any iterable of model inputs, one per batch: a tensor (``model(x)``), a tuple or
            list (``model(*batch)``), or a dict of keyword arguments (``model(**batch)``); e.g. a
            ``DataLoader`` over any dataset (images, text with a collate function, audio).
        out: the output folder (created); shards and ``manifest.json`` go there.
        pool: per name (or a ``{name: pooling}`` dict): ``"avg"`` and ``"max"`` over every dim but
            the batch and the channels (channels-first, channels-last or tokens, read from the
            shape), ``"cls"`` (token 0 of ``(N, L, C)``), ``"mean_tokens"`` (masked by the
            batch's ``attention_mask`` when it has one), ``"none"`` (stored whole), or a function
            of the batch's tensor.
        dtype: autocast dtype: ``torch.bfloat16`` (CPU or CUDA) or ``torch.float16`` (CUDA).
        device: where the model runs (it is moved there, as ``model.to(device)`` would); inputs
            follow, pinned and non-blocking on CUDA. Default: the model's own device.
        out_dtype: the dtype of the stored features (``torch.float16`` halves disk use).
        shard_size: items per shard file; a Ctrl-C loses at most the unfinished shards.
        progress: a progress bar and a line saying what a resumed run kept, on stderr.
        resume: keep the finished shards of an earlier run with the same arguments.
        ids: a function splitting one batch into ``(inputs, row_ids)``, or ``(inputs, row_ids,
            skipped)`` where ``skipped`` lists ``(id, reason)`` of items that could not be read.
            Default: the batch is the input, and the row ids are the item numbers 0, 1, 2, ...
        keys: one key per dataset item (a ``DataLoader`` over a dataset in order), e.g. a file's
            path, size and mtime: a resumed run recomputes the shards whose keys changed.
        config: more values that decide the features (e.g. the preprocessing): recorded, and a
            resumed run with other values is an error.

    Returns:
        ``Summary(out, manifest, computed, reused)``. Read the features with ``fxtap.load_features(out)``.

    Raises:
        FxtapError: ``out`` holds features computed with other arguments, the model fails on a
            batch, or a value cannot be pooled.
        Interrupted: a ``KeyboardInterrupt`` (finished shards are kept).

    Example:
        >>> import tempfile, torch, fxtap
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
        >>> batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
        >>> summary = fxtap.extract(model, ["0", "1"], batches, tempfile.mkdtemp(), progress=False)
        >>> features = fxtap.load_features(summary.out)
        >>> features.tensors["1"].shape, features.files[:3]
        (torch.Size([12, 8]), [0, 1, 2])
    """
    log = _stderr if progress else None
    return run(model, names, batches, out, pool=pool, dtype=dtype, device=device, out_dtype=out_dtype, shard_size=shard_size,
               bar=progress, log=log, resume=resume, ids=ids, keys=keys, config=config)  # fmt: skip


def run(
    model: nn.Module, names: Sequence[str] | Mapping[str, str] | None, batches: Iterable[Any], out: str | os.PathLike[str], *,
    pool: Pool | Mapping[str, Pool] = "avg", dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
    out_dtype: torch.dtype | str | None = None, shard_size: int = 256, bar: bool = True, log: Callable[[str], None] | None = None,
    resume: bool = True, ids: Split | None = None, keys: Sequence[Any] | None = None, config: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Summary:  # fmt: skip
    """``extract`` with the CLI's knobs: ``bar`` (progress bar), ``log`` (info lines), ``warn``."""
    if shard_size < 1:
        raise FxtapError(f"shard_size must be a positive number of items, not {shard_size}")
    job = _job(model, names, pool, dtype, device, out_dtype, Path(out), shard_size, ids, config, warn)
    items = planned(batches)
    with _ranks.process_group() as (rank, world):
        log = log if rank == 0 else None
        try:
            if items is not None:
                count, computed, reused = run_planned(job, batches, items, keys, rank, world, resume, bar and rank == 0, log)
            else:
                count, computed, reused = run_stream(job, batches, rank, world, resume, bar and rank == 0, log)
        except KeyboardInterrupt as interrupt:
            total = None if items is None else len(plan(items, job.shard_size))
            raise Interrupted(job.out, job.kept + len(job.done), total) from interrupt
        computed, reused = _ranks.sum_over_ranks(world, computed, reused)
        if rank != 0:
            return Summary(job.out, None, computed, reused)
        manifest = _features.merge(job.out, count, job.config)
    return Summary(job.out, manifest, computed, reused)


def _job(model, names, pool, dtype, device, out_dtype, out, shard_size, split, config, warn) -> Job:  # type: ignore[no-untyped-def]
    if not isinstance(model, Tapped) and names is None:
        raise FxtapError("extract needs the tap names of the model (or a Tapped from fxtap.tap)")
    tapped = model if isinstance(model, Tapped) else tap(model, names, detach=True)
    inner = tapped.model
    if names is None:  # every output of the Tapped
        names = dict(getattr(tapped, "_request", {}))
    request = list(names.values()) if isinstance(names, Mapping) else list(names)
    if isinstance(pool, Mapping) and request and set(pool) - set(request):
        raise FxtapError(f"pooling given for {', '.join(map(repr, sorted(set(pool) - set(request))))}, which is not among the names {request}")
    pools = {key: describe(pool_of(key, how)) for key, how in pool.items()} if isinstance(pool, Mapping) else describe(pool_of("*", pool))
    if inner.training and warn is not None:
        warn(f"{type(inner).__name__} is in train mode: dropout and batch-norm statistics change its features; call model.eval() first")
    place = _device(inner, device)
    autocast = _dtype(dtype, "dtype")
    autocast = None if autocast == torch.float32 else autocast
    if autocast == torch.float16 and place.type != "cuda":
        raise FxtapError("float16 autocast needs a CUDA device; on the CPU use bfloat16")
    stored = _dtype(out_dtype, "out_dtype")
    if device is not None:
        tapped.to(place)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {
        "model": type(inner).__name__, "weights": _weights_digest(inner), "names": request, "pool": pools,
        "dtype": _name(autocast), "out_dtype": _name(stored), "shard_size": shard_size, **dict(config or {}),
    }  # fmt: skip
    return Job(tapped, request, pool, place, autocast, stored, out, recorded, shard_size, split, warn)


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# -- small helpers -------------------------------------------------------------------------------
def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is None:
        first = next(iter(model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        place = torch.device(device)
    except RuntimeError as error:
        raise FxtapError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from error
    if place.type == "cuda" and not torch.cuda.is_available():
        raise FxtapError(f"device {str(device)!r} asked for, and this machine has no CUDA GPU that torch can use: use cpu")
    return place


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


def _dtype(value: torch.dtype | str | None, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise FxtapError(f"unknown {what} {value!r}: use bfloat16, float16 or float32")
    return _DTYPES[value]


def _weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer: a resumed run with other weights is an error."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu").contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()

def _stderr(text: str) -> None:
    print(f"fxtap: {text}", file=sys.stderr)

