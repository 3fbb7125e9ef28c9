"""The on-disk feature format of ``fxtap.extract`` and ``fxtap extract``: shards, their headers,
the manifest, the resume key, and ``load_features``.

An output folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... and, once
every shard is there, ``manifest.json``. Each shard records in its metadata its own file name,
the arguments that decide its values (``config``), the key of the items it covers (``inputs``:
for an image folder, each file's path, size and modification time), its rows' ids, the items it
skipped (with the reason) and how each feature was pooled. A shard is finished, and a resumed
run keeps it, when all of that matches. The manifest records each shard's size and a digest of
its header, so that a truncated, swapped or copied shard is an error, not wrong rows. Files are
written to a temporary name and renamed: a killed run leaves whole files or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._errors import FxtapError

__all__ = ["FORMAT", "MANIFEST", "VERSION", "Column", "Features", "atomic_write", "finished", "load_features", "merge", "shard_file", "write_shard"]

FORMAT = "fxtap-features"

VERSION = 2  # 2: headers name their file, record item keys, pooling and layout; the manifest records sizes and digests

MANIFEST = "manifest.json"


def shard_file(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


# -- writing -----------------------------------------------------------------------------------
def write_shard(
    out: Path, number: int, *, config: Mapping[str, Any], inputs: Any, tensors: Mapping[str, torch.Tensor],
    ids: Sequence[Any], skipped: Sequence[tuple[Any, str]], features: Mapping[str, Mapping[str, Any]],
) -> None:  # fmt: skip
    """Write shard ``number``: ``tensors`` (one row per id) and the header that makes it resumable."""
    from safetensors.torch import save

    described = {
        name: {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch."), **features.get(name, {})}
        for name, tensor in tensors.items()
    }
    header = {"format": FORMAT, "version": VERSION, "file": shard_file(number), "config": normalized(config), "inputs": inputs}
    header |= {"files": list(ids), "skipped": [list(item) for item in skipped], "features": described}
    data = save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata={"fxtap": json.dumps(header)})
    atomic_write(out / shard_file(number), data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a killed writer) sees all of it or none."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C while writing included
        temporary.unlink(missing_ok=True)
        raise


def normalized(value: Any) -> Any:
    """``value`` as a JSON header holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


# -- the resume key ----------------------------------------------------------------------------
def finished(out: Path, number: int, config: Mapping[str, Any], inputs: Any) -> dict[str, Any] | None:
    """The header of shard ``number`` when it is on disk, whole, computed with ``config`` for the
    items ``inputs`` (``None``: not known yet, the caller compares the rows' ids); else ``None``.

    Raises:
        FxtapError: the shard was computed with other arguments (other names, pooling, weights...).
    """
    from safetensors import SafetensorError

    path = out / shard_file(number)
    if not path.exists():
        return None
    try:
        header = _header(path)
    except (OSError, ValueError, SafetensorError, FxtapError):
        return None  # unreadable or truncated: computed again
    if header.get("version") != VERSION or header.get("file") != path.name:
        return None  # an older format, or a shard renamed into this place: computed again
    config = normalized(config)
    if header["config"] != config:
        changed = [key for key in sorted(set(config) | set(header["config"])) if header["config"].get(key) != config.get(key)]
        raise FxtapError(
            f"{str(out)!r} holds features computed with other arguments ({', '.join(changed)} differ): "
            "use another output folder, or delete this one to start over"
        )
    return header if inputs is None or header["inputs"] == normalized(inputs) else None


def merge(out: Path, count: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` from the headers of shards ``0 .. count - 1``; remove later shards
    (of an earlier, longer run)."""
    entries: list[dict[str, Any]] = []
    files: list[Any] = []
    skipped: list[dict[str, Any]] = []
    features: dict[str, Any] = {}
    for number in range(count):
        path = _existing(out / shard_file(number))
        metadata, header = _metadata(path)
        entries.append({"file": path.name, "rows": len(header["files"]), "bytes": path.stat().st_size, "digest": _digest(metadata)})
        files += header["files"]
        skipped += [{"file": file, "reason": reason} for file, reason in header["skipped"]]
        if header["files"]:
            if features and features != header["features"]:
                raise FxtapError(f"{path.name} holds features of other shapes, dtypes or pooling than the shards before it: {header['features']} vs {features}")
            features = header["features"]
    manifest = {"format": FORMAT, "version": VERSION, "config": normalized(config), "images": len(files) + len(skipped)}
    manifest |= {"rows": len(files), "features": features, "shards": entries, "files": files, "skipped": skipped}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    kept = {entry["file"] for entry in entries}
    for path in out.glob("shard-*.safetensors"):
        if path.name not in kept:
            path.unlink()
    return manifest


# -- reading -----------------------------------------------------------------------------------
class Column:
    """One feature of every row, read lazily from the shards: ``column[i]``, ``column[a:b]``,
    ``column[[i, j]]`` read only the rows asked for; ``column[:]`` (or ``torch.as_tensor``-like
    use in torch functions) reads all of them. ``len``, ``shape`` and ``dtype`` read nothing."""

    def __init__(self, name: str, parts: list[tuple[Any, int]], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.name, self._parts, self.dtype = name, parts, dtype  # parts: (an open safe_open file, its rows)
        self._starts = np.cumsum([0] + [rows for _, rows in parts])
        self.shape = torch.Size((int(self._starts[-1]), *shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Column({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self._parts)})"

    def __getitem__(self, index: Any) -> torch.Tensor:
        rest: tuple[Any, ...] = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, (int, np.integer)):
            position = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= position < len(self):
                raise IndexError(f"row {index} of {self.name!r}, which has {len(self)} rows")
            return self._rows(position, position + 1)[0][rest] if rest else self._rows(position, position + 1)[0]
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(len(self))
            rows = self._rows(start, max(start, stop))
        else:
            positions = torch.arange(len(self))[index]
            rows = self._gather(positions)
        return rows[(slice(None), *rest)] if rest else rows

    def load(self) -> torch.Tensor:
        """Every row, as one tensor in memory."""
        return self._rows(0, len(self))

    def numpy(self) -> np.ndarray:
        """Every row as a NumPy array (bfloat16, which NumPy lacks, becomes float32)."""
        return _numpy(self.load())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.numpy() if dtype is None else self.numpy().astype(dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*map(_loaded, args), **{key: _loaded(value) for key, value in (kwargs or {}).items()})

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        chunks = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for number in range(max(first, 0), len(self._parts)):
            begin = int(self._starts[number])
            if begin >= stop:
                break
            file, rows = self._parts[number]
            low, high = max(start - begin, 0), min(stop - begin, rows)
            if high > low:
                chunks.append(file.get_slice(self.name)[low:high])
        return torch.cat(chunks) if chunks else torch.empty((0, *self.shape[1:]), dtype=self.dtype)

    def _gather(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() == 0:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        low, high = int(positions.min()), int(positions.max()) + 1
        if high - low <= 4 * positions.numel():  # close together: one read, then pick
            return self._rows(low, high)[positions - low]
        return torch.stack([self[int(p)] for p in positions])


class Features(NamedTuple):
    """What ``load_features`` returns: ``tensors[name][i]`` is row ``i``, from ``files[i]``."""

    tensors: Mapping[str, Any]  # tap name -> a Column (lazy; mmap=True) or a tensor (mmap=False)
    files: list[Any]  # the id of each row: the file path relative to the data folder, for the CLI
    skipped: dict[Any, str]  # each item that could not be read -> why

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every feature as a NumPy array (reads everything; bfloat16 becomes float32)."""
        return {name: _numpy(value[:]) for name, value in self.tensors.items()}

    def shards(self) -> Iterator[tuple[list[Any], dict[str, torch.Tensor]]]:
        """``(ids, {name: tensor})`` per shard, in row order: one shard in memory at a time."""
        start = 0
        rows_per_shard = _rows_per_shard(self.tensors)
        for rows in rows_per_shard:
            yield self.files[start : start + rows], {name: value[start : start + rows] for name, value in self.tensors.items()}
            start += rows


def _loaded(value: Any) -> Any:
    return value.load() if isinstance(value, Column) else value


def _numpy(value: torch.Tensor) -> np.ndarray:
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def _rows_per_shard(tensors: Mapping[str, Any]) -> list[int]:
    for value in tensors.values():
        if isinstance(value, Column):
            return [rows for _, rows in value._parts]
        return [len(value)]
    return []


def load_features(outdir: str | os.PathLike[str], *, mmap: bool = True) -> Features:
    """Read back the features that ``fxtap.extract`` or ``fxtap extract`` wrote to ``outdir``.

    Args:
        outdir: the output folder of a finished run (one process or torchrun).
        mmap: read rows only when they are indexed (``tensors[name][i]``, slices), from
            memory-mapped shards, so a feature set larger than memory is usable; ``False`` reads
            every shard into one tensor per name.

    Returns:
        ``Features(tensors, files, skipped)``: ``tensors`` maps each tap name to its rows (a
        lazy ``Column``, or a tensor with ``mmap=False``), row ``i`` coming from ``files[i]`` (the
        row's id: for ``fxtap extract``, a path relative to the ``--data`` folder); ``skipped``
        maps each item that could not be read to the reason. ``to_numpy()`` and ``shards()`` are
        there for pipelines.

    Raises:
        FileNotFoundError: ``outdir`` has no ``manifest.json`` (the run did not finish: run the
            same command again to resume it) or a shard is missing.
        FxtapError: a shard is truncated, or is not the one the manifest lists (swapped or copied).

    Example:
        >>> import contextlib, io, tempfile, fxtap
        >>> from fxtap.cli import main
        >>> outdir = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):  # main() prints a summary
        ...     status = main(["extract", "resnet18", "layer4", "--data", "examples/images", "-o", outdir, "--image-size", "64"])
        >>> features = fxtap.load_features(outdir)
        >>> features.tensors["layer4"].shape, features.files[0], features.skipped
        (torch.Size([6, 512]), 'checker.webp', {})
        >>> features.tensors["layer4"][1:3].shape  # reads two rows
        torch.Size([2, 512])
    """
    from safetensors import safe_open

    root = Path(outdir)
    manifest = _manifest(root)
    parts = []
    for entry in manifest["shards"]:
        path = _checked(root, entry)
        parts.append((safe_open(path, "pt"), entry["rows"]))
    columns = {
        name: Column(name, [(file, rows) for file, rows in parts if rows], tuple(spec["shape"]), getattr(torch, spec["dtype"]))
        for name, spec in manifest["features"].items()
    }
    tensors: Mapping[str, Any] = columns if mmap else {name: column.load() for name, column in columns.items()}
    files = list(manifest["files"])
    for name, value in tensors.items():
        if len(value) != len(files):
            raise FxtapError(f"{str(root)!r} lists {len(files)} rows, and its shards hold {len(value)} of {name!r}: re-run the same command")
    return Features(tensors, files, {item["file"]: item["reason"] for item in manifest["skipped"]})


def _checked(root: Path, entry: Mapping[str, Any]) -> Path:
    """The shard of a manifest ``entry``, checked to be whole and the one the manifest was made from."""
    path = _existing(root / entry["file"])
    size = path.stat().st_size
    rerun = "re-run the same fxtap extract command (or fxtap.extract call) to recompute it"
    if size < entry["bytes"]:
        raise FxtapError(f"shard {str(path)!r} is truncated ({size} of {entry['bytes']} bytes): {rerun}")
    try:
        metadata, header = _metadata(path)
    except Exception as error:
        raise FxtapError(f"shard {str(path)!r} cannot be read ({type(error).__name__}: {error}): {rerun}") from error
    if header.get("file") != path.name:
        raise FxtapError(f"shard {str(path)!r} does not belong here: it is {header.get('file')!r} under another name; {rerun}")
    if size != entry["bytes"] or _digest(metadata) != entry["digest"]:
        raise FxtapError(f"shard {str(path)!r} does not belong here: it is not the shard this manifest lists (copied from another run?); {rerun}")
    return path


def _metadata(path: Path) -> tuple[str, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        metadata = (file.metadata() or {}).get("fxtap", "{}")
    header = json.loads(metadata)
    if header.get("format") != FORMAT:
        raise FxtapError(f"{str(path)!r} is not a shard written by fxtap extract")
    return metadata, dict(header)


def _header(path: Path) -> dict[str, Any]:
    return _metadata(path)[1]


def _digest(metadata: str) -> str:
    return hashlib.sha256(metadata.encode()).hexdigest()[:32]


def _manifest(root: Path) -> dict[str, Any]:
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
    if manifest.get("version") != VERSION:
        raise FxtapError(f"{str(path)!r} was written by another fxtap version (format {manifest.get('version')}): run the extraction again into a new folder")
    return dict(manifest)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} is missing: run the fxtap extract command again to recompute it")
    return path
