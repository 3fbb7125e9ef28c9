"""Features of a folder of images, written to disk in resumable shards, and read back.

An output folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... and, once
every shard is there, ``manifest.json``. Shard ``i`` covers the images
``files[i * shard_size:(i + 1) * shard_size]`` of the sorted file list, whatever the number of
processes: under torchrun, rank ``r`` of ``W`` computes shards ``r, r + W, ...``, so the merged
result is the same, row for row, as one process's. Each shard records in its metadata the
arguments that decide its values, the files it covers, its rows' files and the files it
skipped (with the reason), so that a second run keeps every finished shard and the manifest is
rebuilt from the shards alone. Shards are written to a temporary name and renamed: a killed run
leaves whole shards or none.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._errors import FxtapError
from .._features import FORMAT, MANIFEST, VERSION, atomic_write, existing, read_header
from .zoo import Preprocess, one_line

__all__ = ["IMAGE_SUFFIXES", "Job", "Summary", "extract", "find_images"]

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


def find_images(data: Path, *, limit: int | None = None) -> list[str]:
    """The image files under ``data`` (recursively), as sorted '/'-separated relative paths.

    Raises:
        FxtapError: ``data`` is not a folder, or holds no image.
    """
    if not data.exists():
        raise FxtapError(f"data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise FxtapError(f"data folder {str(data)!r} is not a folder")
    files = sorted(
        path.relative_to(data).as_posix() for path in data.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not files:
        raise FxtapError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(data)!r}")
    return files[:limit] if limit is not None else files


@dataclass(frozen=True)
class Job:
    """One extraction: what to compute (``config`` holds every argument that decides the values)."""

    tapped: nn.Module
    names: list[str]
    preprocess: Preprocess
    data: Path
    out: Path
    files: list[str]
    config: dict[str, Any]
    shard_size: int = 1024
    batch_size: int = 32
    pool: str = "avg"
    workers: int = 0
    device: str = "cpu"


class Shard(NamedTuple):
    number: int
    files: list[str]

    @property
    def file(self) -> str:
        return f"shard-{self.number:05d}.safetensors"


class Summary(NamedTuple):
    """The merged result, as rank 0 sees it after every rank has finished."""

    manifest: dict[str, Any]
    computed: int  # shards computed by this run
    reused: int  # finished shards kept from an earlier run


def plan_shards(files: Sequence[str], shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` files, in file order."""
    return [Shard(i, list(files[start : start + shard_size])) for i, start in enumerate(range(0, len(files), shard_size))]


def shards_of_rank(shards: Sequence[Shard], rank: int, world: int) -> list[Shard]:
    """The shards that rank ``rank`` of ``world`` computes: every ``world``-th, from ``rank``."""
    return list(shards[rank::world])


def extract(job: Job, *, progress: bool = False, warn: Callable[[str], None] = print) -> Summary | None:
    """Compute every shard of ``job`` that is not finished, then merge the manifest.

    Under torchrun (``WORLD_SIZE`` > 1) each rank computes its own shards; after a barrier,
    rank 0 writes the manifest and returns the summary, and the other ranks return ``None``.

    Raises:
        FxtapError: ``job.out`` holds shards computed with other arguments.
    """
    shards = plan_shards(job.files, job.shard_size)
    with _process_group() as (rank, world):
        finished = [_finished(job, shard) for shard in shards]
        if rank == 0:
            (job.out / MANIFEST).unlink(missing_ok=True)  # stale until this run's shards are merged
        _barrier(world)  # every rank has read the same state before any rank writes
        todo = [shard for shard in shards_of_rank(shards, rank, world) if not finished[shard.number]]
        _compute_shards(job, todo, progress=progress and rank == 0, warn=warn)
        _barrier(world)
        if rank != 0:
            return None
        manifest = _merge(job, shards)
    return Summary(manifest, computed=finished.count(False), reused=finished.count(True))


# -- computing ---------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset[tuple[str, "torch.Tensor | None", str]]):
    def __init__(self, data: Path, files: list[str], preprocess: Preprocess) -> None:
        self.data, self.files, self.preprocess = data, files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        from PIL import Image

        file = self.files[index]
        try:
            with Image.open(self.data / file) as image:
                return file, self.preprocess(image.convert("RGB")), ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return file, None, f"{type(error).__name__}: {one_line(error, 200)}"


def _collate(items: list[tuple[str, torch.Tensor | None, str]]) -> tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]:
    read = [(file, tensor) for file, tensor, _ in items if tensor is not None]
    failed = [(file, reason) for file, tensor, reason in items if tensor is None]
    batch = torch.stack([tensor for _, tensor in read]) if read else None
    return [file for file, _ in read], batch, failed


def _compute_shards(job: Job, shards: list[Shard], *, progress: bool, warn: Callable[[str], None]) -> None:
    from tqdm import tqdm  # type: ignore[import-untyped]

    model = job.tapped.to(job.device)
    with tqdm(total=sum(len(s.files) for s in shards), disable=not progress, unit="img", file=sys.stderr) as bar:
        for shard in shards:
            _write_shard(job, shard, *_compute(job, model, shard, bar.update, warn))


def _compute(
    job: Job, model: nn.Module, shard: Shard, advance: Callable[[int], Any], warn: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], list[str], list[tuple[str, str]]]:
    loader = torch.utils.data.DataLoader(
        _Images(job.data, shard.files, job.preprocess), batch_size=job.batch_size, num_workers=job.workers, collate_fn=_collate
    )
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in job.names}
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for read, batch, failed in loader:
        for file, reason in failed:
            warn(f"skipped {file}: {reason}")
        skipped += failed
        if batch is not None:
            out = _forward(model, batch.to(job.device))
            for name in job.names:
                chunks[name].append(pool(name, out[name], job.pool).cpu())
            files += read
        advance(len(read) + len(failed))
    return {name: torch.cat(parts) for name, parts in chunks.items() if parts}, files, skipped


def _forward(model: nn.Module, batch: torch.Tensor) -> dict[str, Any]:
    try:
        with torch.no_grad():
            return dict(model(batch))
    except FxtapError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        owner = type(getattr(model, "model", model)).__name__
        raise FxtapError(
            f"{owner} failed on a batch of images of shape {tuple(batch.shape)} ({type(error).__name__}: {one_line(error, 200)}); "
            "does it take images of that size? Try another --image-size"
        ) from error


def pool(name: str, value: Any, how: str) -> torch.Tensor:
    """A batch of features: ``how="avg"`` averages ``(N, C, H, W, ...)`` over every dim after C,
    and ``(N, L, D)`` (tokens) over L; ``"none"`` keeps the value as it is."""
    if not isinstance(value, torch.Tensor):
        raise FxtapError(
            f"{name!r} is a {type(value).__name__}, not a tensor: extract saves tensors only; "
            "tap the op that picks the tensor you want (e.g. its getitem)"
        )
    tensor = value.detach()
    if how == "none" or tensor.ndim < 3:
        return tensor
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.mean(dim=1) if tensor.ndim == 3 else tensor.mean(dim=tuple(range(2, tensor.ndim)))


# -- shard files -------------------------------------------------------------------------------
def _write_shard(job: Job, shard: Shard, tensors: dict[str, torch.Tensor], files: list[str], skipped: list[tuple[str, str]]) -> None:
    from safetensors.torch import save

    features = {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "config": job.config, "inputs": shard.files, "files": files}
    header |= {"skipped": [list(item) for item in skipped], "features": features}
    data = save({name: t.contiguous() for name, t in tensors.items()}, metadata={"fxtap": json.dumps(header)})
    atomic_write(job.out / shard.file, data)


def _finished(job: Job, shard: Shard) -> bool:
    """Whether ``shard`` is on disk, computed with ``job``'s arguments, for the same files."""
    from safetensors import SafetensorError

    path = job.out / shard.file
    if not path.exists():
        return False
    try:
        header = read_header(path)
    except (OSError, ValueError, SafetensorError):
        return False  # unreadable: computed again
    if header["config"] != _normalized(job.config):
        changed = [key for key in job.config if header["config"].get(key) != _normalized(job.config)[key]]
        raise FxtapError(
            f"{str(job.out)!r} holds features computed with other arguments ({', '.join(changed)} differ): "
            "use another -o folder, or delete this one to start over"
        )
    return bool(header["inputs"] == shard.files)


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(config)))  # as a shard's JSON header holds it (tuples become lists)


def _merge(job: Job, shards: list[Shard]) -> dict[str, Any]:
    """Write ``manifest.json`` from the shards' headers; remove shards of an earlier, longer list."""
    entries: list[dict[str, Any]] = []
    files: list[str] = []
    skipped: list[dict[str, str]] = []
    features: dict[str, Any] = {}
    for shard in shards:
        header = read_header(existing(job.out / shard.file))
        entries.append({"file": shard.file, "rows": len(header["files"])})
        files += header["files"]
        skipped += [{"file": file, "reason": reason} for file, reason in header["skipped"]]
        features = features or header["features"]
    manifest = {"format": FORMAT, "version": VERSION, "config": _normalized(job.config), "images": len(files) + len(skipped)}
    manifest |= {"rows": len(files), "features": features, "shards": entries, "files": files, "skipped": skipped}
    atomic_write(job.out / MANIFEST, json.dumps(manifest, indent=1).encode())
    for path in job.out.glob("shard-*.safetensors"):
        if path.name not in {shard.file for shard in shards}:
            path.unlink()
    return manifest


# -- torchrun ----------------------------------------------------------------------------------
@contextmanager
def _process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)``; under torchrun, a gloo process group for the barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(days=1))  # ranks may finish hours apart
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
