"""``fxtap extract``: the features of a folder of images, a thin layer over ``fxtap.extract``.

The images are the sorted files under ``--data``; item ``i`` is ``files[i]``, so shard ``k`` covers
``files[k * shard_size:(k + 1) * shard_size]`` whatever the number of processes (torchrun ranks
split the shards, see ``fxtap._extract``). Each file's key is its path, size and modification
time: a resumed run recomputes a shard whose images changed. Unreadable images are skipped and
recorded with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _extract
from .._errors import FxtapError
from .zoo import Preprocess, one_line

__all__ = ["IMAGE_SUFFIXES", "extract_folder", "file_keys", "find_images"]

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


def file_keys(data: Path, files: list[str]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: what a resumed run compares to keep a shard."""
    keys: list[list[Any]] = []
    for file in files:
        stat = os.stat(data / file)
        keys.append([file, stat.st_size, stat.st_mtime_ns])
    return keys


def extract_folder(
    tapped: nn.Module, names: list[str], data: Path, files: list[str], preprocess: Preprocess, out: Path, *, config: dict[str, Any],
    batch_size: int, workers: int, bar: bool, warn: Callable[[str], None], log: Callable[[str], None], **options: Any,
) -> _extract.Summary:  # fmt: skip
    """Run ``fxtap.extract`` over the images ``files`` of ``data``; ``options`` go to it as they are."""
    loader = torch.utils.data.DataLoader(_Images(data, files, preprocess), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    return _extract.run(tapped, names, loader, out, ids=_rows, keys=file_keys(data, files), config=config, bar=bar, warn=warn, log=log, **options)


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


def _collate(items: list[tuple[str, torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, list[str], list[tuple[str, str]]]:
    read = [(file, tensor) for file, tensor, _ in items if tensor is not None]
    failed = [(file, reason) for file, tensor, reason in items if tensor is None]
    batch = torch.stack([tensor for _, tensor in read]) if read else None
    return batch, [file for file, _ in read], failed


def _rows(batch: tuple[torch.Tensor | None, list[str], list[tuple[str, str]]]) -> tuple[torch.Tensor | None, list[str], list[tuple[str, str]]]:
    """A collated batch is already ``(images, files, skipped)``."""
    return batch
