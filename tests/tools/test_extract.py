"""``fxtap extract`` and ``fxtap.load_features``: real subprocesses for the runs that matter (one
process, a resumed run, a killed run, two torchrun ranks), this process for the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from support.cli import IMAGES, fxtap_env, run, run_fxtap
from torch import nn

import fxtap
from fxtap import _extract, _pool
from fxtap.cli import main

READABLE = ["checker.webp", "gradient.png", "shapes/circle.png", "shapes/rings.jpeg", "shapes/triangle.bmp", "stripes.jpg"]


def _sleep(x: torch.Tensor) -> torch.Tensor:
    """With ``FXTAP_TEST_SIGNAL=NAME:PATH``, sends the signal NAME (``INT``, ``KILL``) to its own
    process once the file PATH exists, so that a run is stopped midway at a point fixed by the
    run's own progress, not by timing. ``torch.fx.wrap``ped, so the graph calls it on every
    forward: plain code in a traced forward runs once, while tracing."""
    stop = os.environ.get("FXTAP_TEST_SIGNAL")
    if stop:
        name, path = stop.split(":", 1)
        if os.path.exists(path):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return x


torch.fx.wrap("_sleep")


class SlowNet(nn.Module):
    """A small conv net that can stop its own process midway through a run (``_sleep``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(_sleep(x)))


def slow_net() -> nn.Module:
    return SlowNet()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The example images, one corrupt file, one truncated file, and a file that is not an image."""
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "shapes" / "truncated.png").write_bytes((IMAGES / "gradient.png").read_bytes()[:60])
    (folder / "notes.txt").write_text("not an image: not counted")
    return folder


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.safetensors"))}


def reference_features(data: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """resnet18 (seed 0) over each file alone, with torchvision's own ImageNet transform at 32 pixels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms(crop_size=32, resize_size=37)
    tapped = fxtap.tap(model, ["layer2", "layer4.1.relu_1"])
    rows: dict[str, list[torch.Tensor]] = {"layer2": [], "layer4.1.relu_1": []}
    with torch.no_grad():
        for file in files:
            out = tapped(transform(Image.open(data / file).convert("RGB"))[None])
            for name, value in out.items():
                rows[name].append(value.mean(dim=(2, 3)))
    return {name: torch.cat(parts) for name, parts in rows.items()}


def test_extract_writes_features_and_skips_bad_images(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    args = ["extract", "resnet18", "layer2", "layer4.1.relu_1", "--data", data, "-o", out, "--image-size", "32"]
    args += ["--shard-size", "3", "--batch-size", "2"]
    first = run_fxtap(*args)
    assert first.returncode == 0, first.stderr
    assert "fxtap: warning: skipped broken.jpg: UnidentifiedImageError: " in first.stderr
    assert "fxtap: warning: skipped shapes/truncated.png: " in first.stderr
    assert "resnet18 has random weights" in first.stderr
    assert "it/s" not in first.stderr and "img/s" not in first.stderr  # no progress bar when stderr is not a terminal
    assert f"extracted 6 of 8 images to {out}: 3 shards (3 computed, 0 kept from an earlier run)" in first.stdout
    assert "skipped 2 unreadable images:\n  broken.jpg: UnidentifiedImageError: " in first.stdout

    features = fxtap.load_features(out)
    assert features.files == READABLE
    assert set(features.skipped) == {"broken.jpg", "shapes/truncated.png"}
    assert list(features.tensors) == ["layer2", "layer4.1.relu_1"]
    expected = reference_features(data, READABLE)
    for name, value in features.tensors.items():
        torch.testing.assert_close(value[:], expected[name], rtol=1e-4, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["images"], manifest["rows"], len(manifest["skipped"])) == (8, 6, 2)
    pooled = {"pool": "avg", "layout": "channels_first", "pooled_dims": [2, 3]}
    assert manifest["features"] == {
        "layer2": {"shape": [128], "dtype": "float32", **pooled},
        "layer4.1.relu_1": {"shape": [512], "dtype": "float32", **pooled},
    }


def test_extract_second_run_computes_nothing(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["extract", "test_extract:slow_net", "conv", "--data", str(data), "-o", str(tmp_path), "--image-size", "8", "--shard-size", "3"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    before = shard_stats(tmp_path)
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "3 shards (0 computed, 3 kept from an earlier run)" in captured.out
    assert "skipped 2 unreadable images:" in captured.out  # still reported, from the shards' records
    assert "warning: skipped" not in captured.err  # and not read again
    assert shard_stats(tmp_path) == before  # nothing was written again
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_extract_killed_run_keeps_finished_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "features"
    args = ["extract", "test_extract:slow_net", "relu", "--data", str(IMAGES), "-o", str(out), "--image-size", "16"]
    args += ["--shard-size", "1", "--batch-size", "1", "--quiet"]
    # killed by the first forward after shard 1 is on disk (shard 1's write is waited for before
    # shard 2's starts, so that is at the latest the forward of image 4 of 6)
    env = fxtap_env() | {"FXTAP_TEST_SIGNAL": f"KILL:{out / 'shard-00001.safetensors'}"}
    proc = subprocess.Popen([sys.executable, "-m", "fxtap", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish; run the same fxtap extract command again"):
        fxtap.load_features(out)
    finished = shard_stats(out)
    assert 2 <= len(finished) < 6

    capsys.readouterr()
    assert main(args) == 0  # the same command again (in this process, where forward does not sleep)
    assert f"6 shards ({6 - len(finished)} computed, {len(finished)} kept from an earlier run)" in capsys.readouterr().out
    assert {name: stat for name, stat in shard_stats(out).items() if name in finished} == finished
    assert not list(out.glob(".*.tmp"))

    reference = tmp_path / "reference"
    assert main([*args[:5], "-o", str(reference), *args[7:]]) == 0
    got, want = fxtap.load_features(out, mmap=False), fxtap.load_features(reference, mmap=False)
    assert got.files == want.files == READABLE
    torch.testing.assert_close(got.tensors, want.tensors, rtol=0, atol=0)


def test_extract_torchrun_two_ranks_equal_one_process(data: Path, tmp_path: Path) -> None:
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    args = ["extract", "resnet18", "layer2", "layer4.1.relu_1", "--data", str(data), "--image-size", "32", "--shard-size", "2"]
    result = run([*command, "--standalone", "--nproc-per-node", "2", "-m", "fxtap", *args, "-o", str(tmp_path / "ranks")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("extracted 6 of 8 images") == 1  # rank 0 alone reports
    assert "4 shards (4 computed, 0 kept from an earlier run)" in result.stdout
    assert result.stderr.count("resnet18 has random weights") == 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun gives each rank: the same arithmetic
    try:
        assert main([*args, "-o", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    ranks, single = fxtap.load_features(tmp_path / "ranks"), fxtap.load_features(tmp_path / "single")
    assert ranks.files == single.files == READABLE
    assert ranks.skipped == single.skipped
    assert list(ranks.tensors) == list(single.tensors)
    for name in single.tensors:
        assert torch.equal(ranks.tensors[name][:], single.tensors[name][:]), name
    manifest = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "single" / "manifest.json").read_text())


# -- in this process ---------------------------------------------------------------------------
@given(n=st.integers(0, 60), shard_size=st.integers(1, 9), world=st.integers(1, 5))
def test_extract_ranks_split_shards_without_duplicates_or_gaps(n: int, shard_size: int, world: int) -> None:
    spans = _extract.plan(n, shard_size)
    per_rank = [list(range(rank, len(spans), world)) for rank in range(world)]  # what rank r computes
    assert sorted(number for numbers in per_rank for number in numbers) == list(range(len(spans)))
    assert [i for start, stop in spans for i in range(start, stop)] == list(range(n))
    assert all(1 <= stop - start <= shard_size for start, stop in spans)


@pytest.mark.parametrize(
    ("shape", "how", "pooled"),
    [
        ((2, 8, 5, 5), "avg", (2, 8)),
        ((2, 8, 3, 4, 5), "avg", (2, 8)),
        ((2, 7, 16), "avg", (2, 16)),
        ((2, 8), "avg", (2, 8)),
        ((2, 8, 5, 5), "none", (2, 8, 5, 5)),
    ],
)
def test_extract_pool(shape: tuple[int, ...], how: str, pooled: tuple[int, ...]) -> None:
    value = torch.randn(shape)
    assert tuple(_pool.pool("x", value, how).value.shape) == pooled
    if shape == (2, 8, 5, 5) and how == "avg":
        torch.testing.assert_close(_pool.pool("x", value, how).value, value.mean(dim=(2, 3)))


def test_extract_rejects_non_tensor_values() -> None:
    with pytest.raises(fxtap.FxtapError, match="'blk' is a tuple, not a tensor"):
        _pool.pool("blk", (torch.zeros(1),), "avg")


def test_extract_other_arguments_same_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["extract", "test_extract:slow_net", "conv", "--data", str(IMAGES), "-o", str(tmp_path), "--image-size", "8"]
    assert main(args) == 0
    assert main([*args[:2], "relu", *args[3:]]) == 2
    err = capsys.readouterr().err
    assert f"fxtap: error: '{tmp_path}' holds features computed with other arguments (names differ): use another output folder" in err


def test_extract_more_images_recomputes_only_changed_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["extract", "test_extract:slow_net", "conv", "--data", str(IMAGES), "-o", str(tmp_path / "out"), "--image-size", "8"]
    assert main([*args, "--shard-size", "4", "--limit", "5"]) == 0
    assert main([*args, "--shard-size", "4"]) == 0
    assert "2 shards (1 computed, 1 kept from an earlier run)" in capsys.readouterr().out
    assert fxtap.load_features(tmp_path / "out").files == READABLE
    assert main([*args, "--shard-size", "4", "--limit", "2"]) == 0  # shard 0 covers other files now: computed again
    assert "1 shard (1 computed, 0 kept from an earlier run)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert fxtap.load_features(tmp_path / "out").files == READABLE[:2]
    assert main([*args, "--shard-size", "2", "--limit", "2"]) == 2  # another shard size: other arguments
    assert "holds features computed with other arguments (shard_size differ)" in capsys.readouterr().err


def test_extract_progress_bar_on_a_terminal_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ["extract", "test_extract:slow_net", "conv", "--data", str(IMAGES), "--image-size", "8"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert "6/6" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "b"), "--quiet"]) == 0
    assert "6/6" not in capsys.readouterr().err


def test_extract_missing_or_empty_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["extract", "resnet18", "layer2", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "fxtap: error: no images (.bmp, .jpeg, .jpg, .png, .webp) under" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no features folder"):
        fxtap.load_features(tmp_path / "nowhere")


def test_extract_preprocess_matches_torchvision() -> None:
    from fxtap.cli.zoo import load_model

    preprocess = load_model("resnet50").preprocess.scaled(40)
    transform = torchvision.models.ResNet50_Weights.DEFAULT.transforms(crop_size=40, resize_size=41)
    assert (preprocess.resize, preprocess.crop) == (41, 40)  # 232/224 of the crop, as resnet50's weights do
    for file in READABLE:
        image = Image.open(IMAGES / file).convert("RGB")
        torch.testing.assert_close(preprocess(image), transform(image))
