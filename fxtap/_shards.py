"""The walk of ``fxtap.extract`` through the data: each batch through the tapped model, pooled, into
shards written with ``fxtap._features``.

Two ways to walk the data. A ``DataLoader`` over a map-style dataset in order (no shuffle, no
``drop_last``) is planned by item index: shard ``k`` covers items ``k * shard_size`` to
``(k + 1) * shard_size``, and a finished shard (or another rank's) is never even loaded. Any other
iterable is read batch by batch: a shard holds whole batches until it has ``shard_size`` items, and
a finished shard's batches are read but not computed. Under torchrun (``WORLD_SIZE`` > 1) rank
``r`` of ``W`` computes shards ``r, r + W, ...``; rank 0 merges the manifest after a barrier.

A finished shard is written on one background thread while the next shard's batches compute
(``_Writer``): at most one write is in flight, the walk waits for it before the next one and
before it returns, also when it stops on an error or a Ctrl-C (the shard lands whole, atomically).
On CUDA the rows are copied to the host without blocking (pinned pages), and the writer waits
for those copies (a CUDA event recorded after the shard's last batch) before it reads them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import _features, _ranks
from ._errors import FxtapError
from ._pool import Pool, describe, pool_of
from ._pool import pool as pool_value
from ._values import as_call

__all__ = ["BatchFailedError", "Job", "Split", "plan", "planned", "run_planned", "run_stream"]

Split = Callable[[Any], "tuple[Any, Sequence[Any]] | tuple[Any, Sequence[Any], Sequence[tuple[Any, str]]]"]


class BatchFailedError(FxtapError):
    """The model raised on a batch."""


@dataclass
class Job:
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


# -- the two ways through the data ---------------------------------------------------------------
def planned(batches: Iterable[Any]) -> int | None:
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


def run_planned(job, loader, items, keys, rank, world, resume, bar, log) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
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
            pin_memory=job.device.type == "cuda",  # pinned pages only speed up copies to a GPU
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
        )  # fmt: skip
        shard = _Shard(job)
        with _bar(bar, sum(b - a for n, (a, b) in enumerate(spans) if n in set(todo))) as advance, _Writer() as writer:
            for (number, indices), batch in zip(order, reader):
                advance(shard.add(batch, indices[0]))
                if indices[-1] == spans[number][1] - 1:
                    shard.write(number, inputs[number], writer)
    _ranks.barrier(world)
    return count, len(todo), kept.count(True) if rank == 0 else 0


def run_stream(job, batches, rank, world, resume, bar, log) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    if rank == 0:
        (job.out / _features.MANIFEST).unlink(missing_ok=True)
    _ranks.barrier(world)
    number, position, computed, reused = 0, 0, 0, 0
    shard = _Shard(job)
    header = _features.finished(job.out, 0, job.config, None) if resume and rank == 0 else None
    with _bar(bar, None) as advance, _Writer() as writer:
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
                computed, reused = _close(job, shard, number, header, rank, world, computed, reused, writer)
                number += 1
                header = _features.finished(job.out, number, job.config, None) if resume and number % world == rank else None
        if shard.items or number == 0:
            computed, reused = _close(job, shard, number, header, rank, world, computed, reused, writer)
            number += 1
    _say_kept(log, job.out, reused, number)
    _ranks.barrier(world)
    return number, computed, reused


def _close(job, shard, number, header, rank, world, computed, reused, writer) -> tuple[int, int]:  # type: ignore[no-untyped-def]
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
    shard.write(number, None, writer)
    return computed + 1, reused


# -- one shard's rows ----------------------------------------------------------------------------
class _Shard:
    """The rows of the shard being computed."""

    def __init__(self, job: Job) -> None:
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
        return self._tally(ids, skipped, keep_ids=keep_ids)

    def add(self, batch: Any, position: int) -> int:
        inputs, ids, skipped = _split(self.job.split, batch, position)
        for item, reason in skipped:
            if self.job.warn is not None:
                self.job.warn(f"skipped {item}: {reason}")
        if ids:
            for name, (value, described) in _rows(self.job, inputs, len(ids)).items():
                self.chunks.setdefault(name, []).append(value)
                self.features.setdefault(name, described)
        return self._tally(ids, skipped, keep_ids=True)

    def _tally(self, ids: list[Any], skipped: list[Any], *, keep_ids: bool) -> int:
        if keep_ids:
            self.ids += ids
            self.skipped += skipped
        self.last = len(ids) + len(skipped)
        self.items += self.last
        return self.last

    def write(self, number: int, inputs: Any, writer: _Writer) -> None:
        """Hand the shard to ``writer`` (it waits for the previous write first) and start a new one."""
        job, chunks, ids, skipped, features = self.job, self.chunks, self.ids, self.skipped, self.features
        copied = _copies_done(job.device)

        def write() -> None:
            copied()
            tensors = {name: torch.cat(parts) for name, parts in chunks.items()}
            _features.write_shard(job.out, number, config=job.config, inputs=inputs, tensors=tensors, ids=ids,
                                  skipped=skipped, features=features)  # fmt: skip
            job.done.append(number)

        writer.submit(write)
        self.reset()


class _Writer:
    """One background thread that writes shards, one at a time, while the next batches compute.

    ``submit`` waits for the write in flight (so at most two shards' rows are held) and raises its
    error, if any; leaving the ``with`` block waits for the last write, whatever ended the walk.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def __enter__(self) -> _Writer:  # noqa: PYI034 - a private class, never subclassed (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fxtap-shard-writer")
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _copies_done(device: torch.device) -> Callable[[], None]:
    """A wait for the host copies queued so far on ``device``'s current stream (none on the CPU)."""
    if device.type != "cuda":
        return lambda: None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event.synchronize


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


def _rows(job: Job, inputs: Any, n: int) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
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
        rows[name] = (value.to("cpu", non_blocking=cuda), {"pool": describe(how), "layout": pooled.layout, "pooled_dims": pooled.dims})
    return rows


def _call(tapped: nn.Module, inputs: Any) -> dict[str, Any]:
    args, kwargs = as_call(inputs)
    try:
        return dict(tapped(*args, **kwargs))
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


def _say_kept(log: Callable[[str], None] | None, out: Path, kept: int, total: int) -> None:
    if log is not None and kept:
        log(f"resuming: kept {kept} of {total} shards finished by an earlier run in {out}")



@contextmanager
def _bar(show: bool, total: int | None) -> Iterator[Callable[[int], Any]]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    with tqdm(total=total, disable=not show, unit="item", file=sys.stderr) as bar:
        yield bar.update
