"""``fxtap.extract``: the tapped features of every batch of an iterable, pooled, written to disk in
resumable shards (the format is ``fxtap._features``'s).

Two ways to walk the data. A ``DataLoader`` over a map-style dataset in order (no shuffle, no
``drop_last``) is planned by item index: shard ``k`` covers items ``k * shard_size`` to
``(k + 1) * shard_size``, and a finished shard (or another rank's) is never even loaded. Any other
iterable is read batch by batch: a shard holds whole batches until it has ``shard_size`` items, and
a finished shard's batches are read but not computed. Under torchrun (``WORLD_SIZE`` > 1) rank
``r`` of ``W`` computes shards ``r, r + W, ...``; rank 0 merges the manifest after a barrier.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import _features, _ranks
from ._errors import FxtapError
from ._pool import Pool, describe, pool_of
from ._pool import pool as pool_value
from ._tap import Tapped, tap

__all__ = ["BatchFailedError", "Interrupted", "Summary", "extract", "plan", "run"]

Split = Callable[[Any], "tuple[Any, Sequence[Any]] | tuple[Any, Sequence[Any], Sequence[tuple[Any, str]]]"]


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


class BatchFailedError(FxtapError):
    """The model raised on a batch."""


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


@dataclass
class _Job:
    tapped: nn.Module
    names: list[str]
    pool: Pool | Mapping[str, Pool]
    device: torch.device
    autocast: torch.dtype | None
    out_dtype: torch.dtype | None
    out: Path
    config: dict[str, Any]
    shard_size: int
    split: Split | None
    warn: Callable[[str], None] | None
    done: list[int] = field(default_factory=list)  # shards finished by this run
    kept: int = 0  # finished shards of an earlier run, kept


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
    items = _planned(batches)
    with _ranks.process_group() as (rank, world):
        log = log if rank == 0 else None
        try:
            if items is not None:
                count, computed, reused = _run_planned(job, batches, items, keys, rank, world, resume, bar and rank == 0, log)
            else:
                count, computed, reused = _run_stream(job, batches, rank, world, resume, bar and rank == 0, log)
        except KeyboardInterrupt as interrupt:
            total = None if items is None else len(plan(items, job.shard_size))
            raise Interrupted(job.out, job.kept + len(job.done), total) from interrupt
        computed, reused = _ranks.sum_over_ranks(world, computed, reused)
        if rank != 0:
            return Summary(job.out, None, computed, reused)
        manifest = _features.merge(job.out, count, job.config)
    return Summary(job.out, manifest, computed, reused)


def _job(model, names, pool, dtype, device, out_dtype, out, shard_size, split, config, warn) -> _Job:  # type: ignore[no-untyped-def]
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
    return _Job(tapped, request, pool, place, autocast, stored, out, recorded, shard_size, split, warn)


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# -- the two ways through the data ---------------------------------------------------------------
def _planned(batches: Iterable[Any]) -> int | None:
    """The number of items, when ``batches`` is a DataLoader that reads a dataset in order."""
    loader = batches
    if not isinstance(loader, torch.utils.data.DataLoader) or isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    if loader.batch_size is None or loader.drop_last or not isinstance(loader.sampler, torch.utils.data.SequentialSampler):
        return None
    return len(loader.dataset)  # type: ignore[arg-type]


def plan(items: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` item indices of each shard: consecutive, ``shard_size`` items each but the last."""
    return [(start, min(items, start + shard_size)) for start in range(0, items, shard_size)]


def _run_planned(job, loader, items, keys, rank, world, resume, bar, log) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    spans = plan(items, job.shard_size)
    count = len(spans)
    inputs = [list(keys[a:b]) if keys is not None else [a, b] for a, b in spans]
    kept = [resume and _features.finished(job.out, n, job.config, inputs[n]) is not None for n in range(count)]
    job.kept = sum(kept[rank::world])
    if rank == 0:
        (job.out / _features.MANIFEST).unlink(missing_ok=True)  # stale until this run's shards are merged
        _say_kept(log, job.out, kept.count(True), count)
    _ranks.barrier(world)  # every rank has read the same state before any rank writes
    todo = [n for n in range(rank, count, world) if not kept[n]]
    order = [(n, list(range(start, min(start + loader.batch_size, spans[n][1])))) for n in todo for start in range(spans[n][0], spans[n][1], loader.batch_size)]
    if order:
        reader = torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=[indices for _, indices in order], num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory or job.device.type == "cuda", timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
        )  # fmt: skip
        shard = _Shard(job)
        with _bar(bar, sum(b - a for n, (a, b) in enumerate(spans) if n in set(todo))) as advance:
            for (number, indices), batch in zip(order, reader):
                advance(shard.add(batch, indices[0]))
                if indices[-1] == spans[number][1] - 1:
                    shard.write(number, inputs[number])
    _ranks.barrier(world)
    return count, len(todo), kept.count(True) if rank == 0 else 0


def _run_stream(job, batches, rank, world, resume, bar, log) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    if rank == 0:
        (job.out / _features.MANIFEST).unlink(missing_ok=True)
    _ranks.barrier(world)
    number, position, computed, reused = 0, 0, 0, 0
    shard = _Shard(job)
    header = _features.finished(job.out, 0, job.config, None) if resume and rank == 0 else None
    with _bar(bar, None) as advance:
        for batch in batches:
            if number % world != rank:
                shard.count(batch, position)
            elif header is not None:
                shard.count(batch, position, keep_ids=True)
            else:
                shard.add(batch, position)
            position += shard.last
            advance(shard.last)
            if shard.items >= job.shard_size:
                computed, reused = _close(job, shard, number, header, rank, world, computed, reused)
                number += 1
                header = _features.finished(job.out, number, job.config, None) if resume and number % world == rank else None
        if shard.items or number == 0:
            computed, reused = _close(job, shard, number, header, rank, world, computed, reused)
            number += 1
    _say_kept(log, job.out, reused, number)
    _ranks.barrier(world)
    return number, computed, reused


def _close(job, shard, number, header, rank, world, computed, reused) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    if number % world != rank:
        shard.reset()
        return computed, reused
    if header is not None:
        if [header["files"], [item[0] for item in header["skipped"]]] != [shard.ids, [item[0] for item in shard.skipped]]:
            raise FxtapError(
                f"{_features.shard_file(number)} in {str(job.out)!r} holds other rows than these batches give (its ids differ): "
                "use another output folder, or resume=False to compute everything again"
            )
        shard.reset()
        job.kept += 1
        return computed, reused + 1
    shard.write(number, None)
    return computed + 1, reused


# -- one shard's rows ----------------------------------------------------------------------------
class _Shard:
    """The rows of the shard being computed."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.reset()

    def reset(self) -> None:
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.features: dict[str, dict[str, Any]] = {}
        self.ids: list[Any] = []
        self.skipped: list[tuple[Any, str]] = []
        self.items = 0
        self.last = 0

    def count(self, batch: Any, position: int, *, keep_ids: bool = False) -> int:
        """Count a batch that is not computed here (another rank's, or a finished shard's)."""
        _, ids, skipped = _split(self.job.split, batch, position)
        if keep_ids:
            self.ids += ids
            self.skipped += skipped
        self.last = len(ids) + len(skipped)
        self.items += self.last
        return self.last

    def add(self, batch: Any, position: int) -> int:
        inputs, ids, skipped = _split(self.job.split, batch, position)
        for item, reason in skipped:
            if self.job.warn is not None:
                self.job.warn(f"skipped {item}: {reason}")
        if ids:
            for name, (value, described) in _rows(self.job, inputs, len(ids)).items():
                self.chunks.setdefault(name, []).append(value)
                self.features.setdefault(name, described)
        self.ids += ids
        self.skipped += skipped
        self.last = len(ids) + len(skipped)
        self.items += self.last
        return self.last

    def write(self, number: int, inputs: Any) -> None:
        tensors = {name: torch.cat(parts) for name, parts in self.chunks.items()}
        _features.write_shard(self.job.out, number, config=self.job.config, inputs=inputs, tensors=tensors, ids=self.ids,
                              skipped=self.skipped, features=self.features)  # fmt: skip
        self.job.done.append(number)
        self.reset()


def _split(split: Split | None, batch: Any, position: int) -> tuple[Any, list[Any], list[tuple[Any, str]]]:
    if split is None:
        return batch, list(range(position, position + _length(batch))), []
    parts = split(batch)
    inputs, ids = parts[0], parts[1]
    skipped = [tuple(item) for item in parts[2]] if len(parts) > 2 else []
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return inputs, ids, skipped


def _length(batch: Any) -> int:
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return int(leaf.shape[0])
    raise FxtapError(f"a batch of {type(batch).__name__} holds no tensor with a batch dim: give ids= to say which rows it holds")


def _rows(job: _Job, inputs: Any, n: int) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
    """One batch through the model, each name pooled, on the CPU in the stored dtype."""
    cuda = job.device.type == "cuda"
    inputs = pytree.tree_map(lambda v: v.to(job.device, non_blocking=cuda) if isinstance(v, torch.Tensor) else v, inputs)
    autocast = torch.autocast(job.device.type, dtype=job.autocast) if job.autocast is not None else nullcontext()
    with torch.no_grad(), autocast:
        values = _call(job.tapped, inputs)
    spatial = _spatial(inputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    rows = {}
    for name in job.names or list(values):
        if name not in values:
            raise FxtapError(f"the tapped model returned no {name!r} (it returned {', '.join(map(repr, values))})")
        how = pool_of(name, job.pool)
        pooled = pool_value(name, values[name], how, spatial=spatial, mask=mask)
        value = pooled.value.to(job.out_dtype) if job.out_dtype is not None else pooled.value
        if len(value) != n:
            raise FxtapError(f"{name!r} has {len(value)} rows for a batch of {n} items (ids): is its dim 0 the batch?")
        rows[name] = (value.to("cpu"), {"pool": describe(how), "layout": pooled.layout, "pooled_dims": pooled.dims})
    return rows


def _call(tapped: nn.Module, inputs: Any) -> dict[str, Any]:
    try:
        if isinstance(inputs, Mapping):
            return dict(tapped(**inputs))
        if isinstance(inputs, (tuple, list)):
            return dict(tapped(*inputs))
        return dict(tapped(inputs))
    except FxtapError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        owner = type(getattr(tapped, "model", tapped)).__name__
        text = " ".join(str(error).split())
        raise BatchFailedError(f"{owner} failed on a batch of {_describe(inputs)} ({type(error).__name__}: {text[:200]})") from error


def _describe(inputs: Any) -> str:
    leaves = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    return ", ".join(f"{str(leaf.dtype).removeprefix('torch.')} {tuple(leaf.shape)}" for leaf in leaves) or type(inputs).__name__


def _spatial(inputs: Any) -> tuple[int, ...]:
    """The spatial size of the first floating input of 4 or more dims (an image), else ``()``."""
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.ndim >= 4:
            return tuple(leaf.shape[2:])
    return ()


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


def _say_kept(log: Callable[[str], None] | None, out: Path, kept: int, total: int) -> None:
    if log is not None and kept:
        log(f"resuming: kept {kept} of {total} shards finished by an earlier run in {out}")


def _stderr(text: str) -> None:
    print(f"fxtap: {text}", file=sys.stderr)


@contextmanager
def _bar(show: bool, total: int | None) -> Iterator[Callable[[int], Any]]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    with tqdm(total=total, disable=not show, unit="item", file=sys.stderr) as bar:
        yield bar.update
