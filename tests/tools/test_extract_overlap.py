"""``fxtap.extract`` writes a finished shard on a background thread while the next batches run.

Each test holds the write of shard 0 until the walk has gone on to shard 1's data (an event that
only the main thread's walk sets), so a walk that writes in line would never set it: the write
then gives up after a long wait and the test fails. Nothing here depends on timing: the waits only
bound how long a broken implementation takes to fail.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxtap
from fxtap import _extract, _features

_PATIENCE_S = 60.0  # how long a held write waits for the walk before it reports that it was not overlapped


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()


def batches(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(n)]


class HeldWrite:
    """``write_shard`` that holds shard 0 until ``moved_on`` is set, and records what it saw."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: int | None = None) -> None:
        self.moved_on = threading.Event()
        self.overlapped: bool | None = None
        self.threads: list[str] = []
        self.original = _features.write_shard
        self.fail = fail
        monkeypatch.setattr(_features, "write_shard", self)

    def __call__(self, out: Path, number: int, **kwargs: Any) -> None:
        self.threads.append(threading.current_thread().name)
        if number == 0:
            self.overlapped = self.moved_on.wait(_PATIENCE_S)
        if number == self.fail:
            raise OSError(28, "No space left on device")
        self.original(out, number, **kwargs)


def truth(model: nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).mean(dim=(2, 3)) for b in data])


def test_a_shard_is_written_while_the_walk_computes_the_next_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held, data = HeldWrite(monkeypatch), batches()

    def walk() -> Iterator[torch.Tensor]:
        yield from data[:3]  # shard 0 is batches 0 and 1 (4 items); batch 2 is computed next
        held.moved_on.set()  # the walk asks for batch 3: batch 2 went through the model meanwhile
        yield data[3]

    summary = fxtap.extract(conv_net(), ["2"], walk(), tmp_path, shard_size=4, progress=False)
    assert held.overlapped is True, "shard 0 was written in line: the walk waited for the disk"
    assert held.threads and all(name.startswith("fxtap-shard-writer") for name in held.threads)
    assert (summary.computed, summary.reused) == (2, 0)
    torch.testing.assert_close(fxtap.load_features(tmp_path).tensors["2"][:], truth(conv_net(), data))


def test_a_planned_loader_overlaps_writing_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held, data = HeldWrite(monkeypatch), torch.cat(batches())

    class Items(torch.utils.data.Dataset[torch.Tensor]):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, index: int) -> torch.Tensor:
            if index == 6:  # shard 1's second batch is loaded: its first batch was computed meanwhile
                held.moved_on.set()
            return data[index]

    loader = torch.utils.data.DataLoader(Items(), batch_size=2)
    fxtap.extract(conv_net(), ["2"], loader, tmp_path, shard_size=4, progress=False)
    assert held.overlapped is True
    torch.testing.assert_close(fxtap.load_features(tmp_path).tensors["2"][:], truth(conv_net(), list(data.split(2))))


def test_a_failed_write_stops_the_walk_and_keeps_the_shards_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held, data = HeldWrite(monkeypatch, fail=1), batches(6)
    held.moved_on.set()
    with pytest.raises(OSError, match="No space left"):
        fxtap.extract(conv_net(), ["2"], data, tmp_path, shard_size=4, progress=False)
    assert _features.finished(tmp_path, 0, _config_of(tmp_path), None) is not None  # shard 0 landed whole
    assert not (tmp_path / _features.shard_file(1)).exists()
    monkeypatch.setattr(_features, "write_shard", held.original)
    summary = fxtap.extract(conv_net(), ["2"], data, tmp_path, shard_size=4, progress=False)
    assert (summary.computed, summary.reused) == (2, 1)
    torch.testing.assert_close(fxtap.load_features(tmp_path).tensors["2"][:], truth(conv_net(), data))


def test_ctrl_c_while_a_shard_is_being_written_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held, data = HeldWrite(monkeypatch), batches()

    def walk() -> Iterator[torch.Tensor]:
        yield from data[:2]  # shard 0 is complete and handed to the writer, which holds it
        held.moved_on.set()
        raise KeyboardInterrupt

    with pytest.raises(_extract.Interrupted) as info:
        fxtap.extract(conv_net(), ["2"], walk(), tmp_path, shard_size=4, progress=False)
    assert info.value.finished == 1  # counted after the held write landed
    monkeypatch.setattr(_features, "write_shard", held.original)
    summary = fxtap.extract(conv_net(), ["2"], data, tmp_path, shard_size=4, progress=False)
    assert (summary.computed, summary.reused) == (1, 1)
    torch.testing.assert_close(fxtap.load_features(tmp_path).tensors["2"][:], truth(conv_net(), data))


def _config_of(out: Path) -> dict[str, Any]:
    import json

    from safetensors import safe_open

    with safe_open(str(out / _features.shard_file(0)), "pt") as file:
        return dict(json.loads(file.metadata()["fxtap"])["config"])
