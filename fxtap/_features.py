"""The on-disk feature format of ``fxtap extract``: shards, their headers, the manifest, and ``load_features``.

An output folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... and, once
every shard is there, ``manifest.json``. Each shard records in its metadata the arguments that
decide its values, the files it covers, its rows' files and the files it skipped (with the
reason). Files are written to a temporary name and renamed: a killed run leaves whole files or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ._errors import FxtapError

__all__ = ["FORMAT", "MANIFEST", "VERSION", "Features", "atomic_write", "existing", "load_features", "read_header", "read_manifest"]

FORMAT = "fxtap-features"

VERSION = 1

MANIFEST = "manifest.json"


class Features(NamedTuple):
    """What ``load_features`` returns."""

    tensors: dict[str, torch.Tensor]  # tap name -> a tensor with one row per file
    files: list[str]  # the source of each row, relative to the data folder
    skipped: dict[str, str]  # each unreadable file -> why it was skipped


def load_features(outdir: str | os.PathLike[str]) -> Features:
    """Read back the features that ``fxtap extract`` wrote to ``outdir``.

    Args:
        outdir: the ``-o`` folder of a finished ``fxtap extract`` run (one process or torchrun).

    Returns:
        ``Features(tensors, files, skipped)``: ``tensors`` maps each tap name to a tensor whose
        row ``i`` comes from the image ``files[i]`` (a path relative to the ``--data`` folder);
        ``skipped`` maps each image that could not be read to the reason.

    Raises:
        FileNotFoundError: ``outdir`` has no ``manifest.json`` (the run did not finish: run the
            same command again to resume it) or a shard is missing.

    Example:
        >>> import contextlib, io, tempfile, fxtap
        >>> from fxtap.cli import main
        >>> outdir = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):  # main() prints a summary
        ...     status = main(["extract", "resnet18", "layer4", "--data", "examples/images", "-o", outdir, "--image-size", "64"])
        >>> features = fxtap.load_features(outdir)
        >>> features.tensors["layer4"].shape, features.files[0], features.skipped
        (torch.Size([6, 512]), 'checker.webp', {})
    """
    from safetensors.torch import load_file

    root = Path(outdir)
    manifest = read_manifest(root)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in manifest["features"]}
    for entry in manifest["shards"]:
        if entry["rows"]:
            tensors = load_file(existing(root / entry["file"]))
            for name, parts in chunks.items():
                parts.append(tensors[name])
    tensors = {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in chunks.items()}
    files = list(manifest["files"])
    for name, value in tensors.items():
        if len(value) != len(files):
            raise AssertionError(f"expected {len(files)} rows of {name!r} in {root}, got {len(value)}")
    return Features(tensors, files, {item["file"]: item["reason"] for item in manifest["skipped"]})


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a killed writer) sees all of it or none."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        metadata = file.metadata() or {}
    header = json.loads(metadata.get("fxtap", "{}"))
    if header.get("format") != FORMAT:
        raise FxtapError(f"{str(path)!r} is not a shard written by fxtap extract")
    return dict(header)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        if not root.is_dir():
            raise FileNotFoundError(f"no features folder {str(root)!r}")
        raise FileNotFoundError(
            f"{str(root)!r} has no {MANIFEST}: the extraction did not finish; run the same fxtap extract command again to resume it"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise FxtapError(f"{str(path)!r} is not a manifest written by fxtap extract")
    return dict(manifest)


def existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} is missing: run the fxtap extract command again to recompute it")
    return path
