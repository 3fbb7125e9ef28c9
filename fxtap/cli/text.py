"""``fxtap extract MODEL NAME... --text FILE``: the features of each line of a text file.

Each non-empty line is one example, its row id the line number (from 1). A Hugging Face
tokenizer is read from a local folder (``--tokenizer PATH``, else the ``hf:PATH`` model's own
folder); nothing is downloaded. Each line's key is its number and a hash of its text, so a
resumed run recomputes a shard whose lines changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .._errors import FxtapError
from .zoo import one_line

__all__ = ["read_lines", "text_loader", "tokenizer_for"]


def read_lines(path: Path, *, limit: int | None = None) -> list[tuple[int, str]]:
    """``(line number, text)`` of each non-empty line of ``path``.

    Raises:
        FxtapError: the file does not exist, is not UTF-8 text, or has no non-empty line.
    """
    if not path.is_file():
        raise FxtapError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FxtapError(f"{str(path)!r} is not UTF-8 text ({one_line(error, 100)}): --text takes one example per line") from error
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise FxtapError(f"{str(path)!r} has no non-empty line: --text takes one example per line")
    return lines[:limit] if limit is not None else lines


def tokenizer_for(spec: str, tokenizer: str | None) -> Any:
    """The tokenizer in the folder ``tokenizer`` (default: the folder of an ``hf:PATH`` model)."""
    folder = tokenizer or (spec.removeprefix("hf:") if spec.startswith("hf:") else None)
    if folder is None:
        raise FxtapError("--text needs a tokenizer: give --tokenizer PATH, a local folder with its files (fxtap downloads nothing), or an hf:PATH model")
    if not Path(folder).is_dir():
        raise FxtapError(f"tokenizer folder {folder!r} does not exist (fxtap downloads nothing)")
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise FxtapError("--text needs transformers, which is not installed: pip install transformers") from error
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise FxtapError(f"cannot load a tokenizer from {folder!r} ({type(error).__name__}: {one_line(error, 200)})") from error


def text_loader(lines: list[tuple[int, str]], tokenizer: Any, *, batch_size: int, max_length: int) -> torch.utils.data.DataLoader[Any]:
    """Batches of ``(tokenizer output as a dict, line numbers)``, padded per batch."""

    def collate(items: list[tuple[int, str]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        encoded = tokenizer([text for _, text in items], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(encoded), [number for number, _ in items]

    return torch.utils.data.DataLoader(lines, batch_size=batch_size, collate_fn=collate)  # type: ignore[arg-type]


def line_keys(lines: list[tuple[int, str]]) -> list[list[Any]]:
    """``[line number, hash of its text]`` of each line: what a resumed run compares."""
    return [[number, hashlib.blake2b(text.encode(), digest_size=8).hexdigest()] for number, text in lines]
