"""``fxtap.extract`` as a library: batches of any kind, pooling by layout, dtypes, lazy reading,
and features on disk that are what they say (swapped, copied or truncated shards are errors)."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtap
from fxtap import _extract


class Words(nn.Module):
    """A tiny text encoder: token ids (and an attention mask) -> (N, L, C) states."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mix(self.embed(input_ids))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()


def image_batches(n: int = 5, size: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 10, 10, generator=generator) for _ in range(n)]


def test_extract_library_rows_equal_eager_and_resume_keeps_them(tmp_path: Path) -> None:
    model, batches = conv_net(), image_batches()
    summary = fxtap.extract(model, ["1", "2"], batches, tmp_path, shard_size=4, progress=False)
    assert (summary.computed, summary.reused) == (3, 0)  # 15 rows in whole batches of 3: shards close at >= 4 items: 6, 6, 3
    features = fxtap.load_features(tmp_path)
    with torch.no_grad():
        truth = torch.cat([model[:2](b).mean(dim=(2, 3)) for b in batches]), torch.cat([model(b).mean(dim=(2, 3)) for b in batches])
    torch.testing.assert_close(features.tensors["1"][:], truth[0])
    torch.testing.assert_close(features.tensors["2"][:], truth[1])
    assert features.files == list(range(15))
    again = fxtap.extract(model, ["1", "2"], batches, tmp_path, shard_size=4, progress=False)
    assert (again.computed, again.reused) == (0, 3)


def test_extract_library_dataloader_of_text_dicts_with_ids(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Words().eval()
    ids = torch.randint(0, 50, (7, 5))
    mask = torch.ones(7, 5, dtype=torch.long)
    mask[:, 3:] = 0  # padding: mean_tokens must leave it out
    examples = [{"input_ids": ids[i], "attention_mask": mask[i], "name": f"doc{i}"} for i in range(7)]

    def collate(items: list[dict]) -> dict:
        return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "attention_mask")} | {"name": [item["name"] for item in items]}

    loader = torch.utils.data.DataLoader(examples, batch_size=3, collate_fn=collate)  # type: ignore[arg-type]
    split = lambda batch: ({k: v for k, v in batch.items() if k != "name"}, batch["name"])
    pools = {"mix": "mean_tokens", "embed": "cls"}
    fxtap.extract(model, ["embed", "mix"], loader, tmp_path, pool=pools, ids=split, shard_size=2, progress=False)
    features = fxtap.load_features(tmp_path)
    assert features.files == [f"doc{i}" for i in range(7)]
    with torch.no_grad():
        states = model(ids)
    torch.testing.assert_close(features.tensors["mix"][:], states[:, :3].mean(dim=1))
    torch.testing.assert_close(features.tensors["embed"][:], model.embed(ids)[:, 0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["features"]["mix"] | {} == {"shape": [6], "dtype": "float32", "pool": "mean_tokens", "layout": "tokens", "pooled_dims": [1]}


def test_extract_channels_last_swin_pools_over_space(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    images = torch.randn(2, 3, 64, 64)
    fxtap.extract(model, ["features.0", "features.1"], [images], tmp_path, progress=False)
    features = fxtap.load_features(tmp_path)
    with torch.no_grad():
        maps = fxtap.tap(model, ["features.0"])(images)["features.0"]
    assert maps.shape == (2, 16, 16, 96)  # (N, H, W, C)
    assert features.tensors["features.0"].shape == (2, 96)
    torch.testing.assert_close(features.tensors["features.0"][:], maps.mean(dim=(1, 2)))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["features"]["features.0"]["layout"] == "channels_last"
    assert manifest["features"]["features.0"]["pooled_dims"] == [1, 2]


@settings(max_examples=30, deadline=None)
@given(
    channels=st.integers(1, 6), height=st.integers(1, 5), width=st.integers(1, 5), patch=st.sampled_from([1, 2, 4]),
    last=st.booleans(), how=st.sampled_from(["avg", "max"]),
)  # fmt: skip
def test_extract_pool_reduces_space_keeps_channels(channels: int, height: int, width: int, patch: int, last: bool, how: str) -> None:
    value = torch.randn(2, height, width, channels) if last else torch.randn(2, channels, height, width)
    pooled = fxtap._pool.pool("x", value, how, spatial=(height * patch, width * patch))
    space = (1, 2) if last and channels not in (height,) else (2, 3)
    if last and channels == height:
        return  # (N, C, H, W) and (N, H, W, C) read alike: channels first wins, as in fxtap.backbone
    reduce = value.mean if how == "avg" else value.amax
    torch.testing.assert_close(pooled.value, reduce(dim=space))
    assert pooled.value.shape == (2, channels)


def test_extract_bfloat16_autocast_and_float16_storage(tmp_path: Path) -> None:
    model, batches = conv_net(), image_batches(2)
    fxtap.extract(model, ["2"], batches, tmp_path / "bf16", dtype=torch.bfloat16, out_dtype="float16", progress=False)
    fxtap.extract(model, ["2"], batches, tmp_path / "fp32", progress=False)
    low, full = fxtap.load_features(tmp_path / "bf16").tensors["2"], fxtap.load_features(tmp_path / "fp32").tensors["2"]
    assert (low.dtype, full.dtype) == (torch.float16, torch.float32)
    torch.testing.assert_close(low[:].float(), full[:], rtol=0.05, atol=0.05)
    assert not torch.equal(low[:].float(), full[:])  # autocast did run in bfloat16
    with pytest.raises(fxtap.FxtapError, match="float16 autocast needs a CUDA device"):
        fxtap.extract(model, ["2"], batches, tmp_path / "fp16", dtype=torch.float16, progress=False)


def test_load_features_lazy_rows_slices_numpy_and_shards(tmp_path: Path) -> None:
    model, batches = conv_net(), image_batches(4)
    fxtap.extract(model, ["2"], batches, tmp_path, shard_size=5, progress=False)
    lazy, eager = fxtap.load_features(tmp_path), fxtap.load_features(tmp_path, mmap=False)
    column, full = lazy.tensors["2"], eager.tensors["2"]
    assert isinstance(full, torch.Tensor) and len(column) == len(full) == 12
    for index in [0, 5, -1, slice(2, 9), slice(None), slice(4, 4), [1, 7, 11], torch.tensor([3, 0]), slice(0, 12, 5), (slice(1, 3), 2)]:
        assert torch.equal(column[index], full[index]), index
    assert (lazy.to_numpy()["2"] == full.numpy()).all()
    parts = list(lazy.shards())
    assert [ids for ids, _ in parts] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert torch.equal(torch.cat([tensors["2"] for _, tensors in parts]), full)


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    fxtap.extract(conv_net(), ["2"], image_batches(4), tmp_path / "out", shard_size=3, progress=False)
    return tmp_path / "out"


def test_load_features_swapped_shards_are_an_error(finished: Path) -> None:
    first, second = finished / "shard-00000.safetensors", finished / "shard-00001.safetensors"
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    with pytest.raises(fxtap.FxtapError, match=r"shard-00000.safetensors' does not belong here: it is 'shard-00001.safetensors' under another name; re-run the same"):
        fxtap.load_features(finished)


def test_load_features_shard_copied_from_another_run_is_an_error(finished: Path, tmp_path: Path) -> None:
    fxtap.extract(conv_net(), ["2"], image_batches(4, size=2), tmp_path / "other", shard_size=3, progress=False)
    shutil.copy(tmp_path / "other" / "shard-00001.safetensors", finished / "shard-00001.safetensors")
    with pytest.raises(fxtap.FxtapError, match="shard-00001.safetensors' does not belong here: it is not the shard this manifest lists"):
        fxtap.load_features(finished)


def test_load_features_truncated_shard_names_it_and_says_rerun(finished: Path) -> None:
    shard = finished / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(fxtap.FxtapError, match=r"shard-00002.safetensors' is truncated \(\d+ of \d+ bytes\): re-run the same fxtap extract command"):
        fxtap.load_features(finished)
    fxtap.extract(conv_net(), ["2"], image_batches(4), finished, shard_size=3, progress=False)  # the same call recomputes it
    assert len(fxtap.load_features(finished).tensors["2"]) == 12


def test_extract_interrupt_keeps_finished_shards_and_resumes(tmp_path: Path) -> None:
    batches = image_batches(6, size=2)

    def interrupted() -> Iterator[torch.Tensor]:
        yield from batches[:5]
        raise KeyboardInterrupt

    with pytest.raises(_extract.Interrupted) as info:
        fxtap.extract(conv_net(), ["2"], interrupted(), tmp_path, shard_size=4, progress=False)
    assert (info.value.finished, info.value.total) == (2, None)  # 10 rows read: shards 0 and 1 (4 items each) finished
    assert isinstance(info.value, KeyboardInterrupt)
    summary = fxtap.extract(conv_net(), ["2"], batches, tmp_path, shard_size=4, progress=False)
    assert (summary.computed, summary.reused) == (1, 2)
    reference = fxtap.extract(conv_net(), ["2"], batches, tmp_path / "ref", shard_size=4, progress=False)
    assert torch.equal(fxtap.load_features(tmp_path).tensors["2"][:], fxtap.load_features(reference.out).tensors["2"][:])


def test_extract_other_weights_same_folder_is_an_error(tmp_path: Path) -> None:
    fxtap.extract(conv_net(), ["2"], image_batches(1), tmp_path, progress=False)
    changed = conv_net()
    with torch.no_grad():
        changed[0].bias.add_(1)
    with pytest.raises(fxtap.FxtapError, match=r"other arguments \(weights differ\)"):
        fxtap.extract(changed, ["2"], image_batches(1), tmp_path, progress=False)


def test_extract_planned_loader_skips_finished_shards_without_loading_them(tmp_path: Path) -> None:
    loaded: list[int] = []

    class Counted(torch.utils.data.Dataset[torch.Tensor]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> torch.Tensor:
            loaded.append(index)
            return torch.full((3, 6, 6), float(index))

    loader = torch.utils.data.DataLoader(Counted(), batch_size=3)
    fxtap.extract(conv_net(), ["2"], loader, tmp_path, shard_size=4, progress=False)
    (tmp_path / "shard-00001.safetensors").unlink()
    loaded.clear()
    summary = fxtap.extract(conv_net(), ["2"], loader, tmp_path, shard_size=4, progress=False)
    assert (summary.computed, summary.reused, sorted(loaded)) == (1, 2, [4, 5, 6, 7])
    assert fxtap.load_features(tmp_path).files == list(range(10))


def test_extract_cpu_job_with_a_pinning_loader_skips_pinning(tmp_path: Path) -> None:
    # the CUDA-only knobs on the CPU: a loader that asks for pinned memory (as a GPU recipe does)
    # on a machine whose model runs on the CPU; fxtap re-reads it (a planned loader) unpinned,
    # with no "no accelerator" warning, and the rows equal eager
    model = conv_net()
    data = torch.utils.data.TensorDataset(torch.cat(image_batches()))
    loader = torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True, collate_fn=lambda items: torch.stack([i[0] for i in items]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxtap.extract(model, ["2"], loader, tmp_path, device="cpu", shard_size=8, progress=False)
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    with torch.no_grad():
        truth = model(data.tensors[0]).mean(dim=(2, 3))
    torch.testing.assert_close(fxtap.load_features(tmp_path).tensors["2"][:], truth)
