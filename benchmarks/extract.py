"""End-to-end extraction speed: ``fxtap.extract`` against a hand-written loop, side by side.

    python benchmarks/extract.py [--images 1000] [--size 224] [--batch-size 32] [--workers 2] [--rounds 2]

Writes ``--images`` JPEGs (320x240, made with PIL, not committed) to ``--folder`` once, then, round
by round and in a rotated order, runs three ways to store resnet50's ``layer3`` average-pooled
over the folder, each reading it with the same ``DataLoader`` (``--workers`` decoding processes):

- fxtap: ``fxtap.extract(model, ["layer3"], loader, out)`` (shards, manifest, resume key);
- hand loop: a truncated ``nn.Sequential`` up to ``layer3``, pooled, ``torch.save`` at the end;
- hook recipe: a forward hook on ``layer3`` of the whole model (which runs layer4 and fc too).

It prints images/s (median over rounds) and each ratio to the hand loop (target: fxtap >= 0.95x),
then where the time goes: decoding alone (the loader with no model), the forward alone (on
batches already in memory, truncated model and fxtap's tapped model), and writing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fxtap, not an installed one
import fxtap
from fxtap.cli.zoo import IMAGENET


class Folder(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The JPEGs of a folder, decoded and preprocessed as ``fxtap extract`` does (ImageNet, 256 -> 224)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.files = sorted(folder.glob("*.jpg"))
        self.preprocess = IMAGENET.scaled(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            return self.preprocess(image.convert("RGB")), index


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            noise = torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(noise).resize((320, 240), Image.Resampling.BILINEAR).save(path, quality=90)


def truncated(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3)


def run_fxtap(model: nn.Module, loader: torch.utils.data.DataLoader, out: Path) -> None:
    fxtap.extract(model, ["layer3"], loader, out, ids=lambda batch: (batch[0], batch[1]), progress=False, resume=False)


def run_hand(model: nn.Module, loader: torch.utils.data.DataLoader, out: Path) -> None:
    trunk = truncated(model)
    rows, ids = [], []
    with torch.no_grad():
        for images, index in loader:
            rows.append(trunk(images).mean(dim=(2, 3)))
            ids += index.tolist()
    torch.save({"layer3": torch.cat(rows), "ids": ids}, out / "features.pt")


def run_hooks(model: nn.Module, loader: torch.utils.data.DataLoader, out: Path) -> None:
    rows, ids = [], []
    handle = model.layer3.register_forward_hook(lambda module, args, output: rows.append(output.detach().mean(dim=(2, 3))))
    try:
        with torch.no_grad():
            for images, index in loader:
                model(images)
                ids += index.tolist()
    finally:
        handle.remove()
    torch.save({"layer3": torch.cat(rows), "ids": ids}, out / "features.pt")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fxtap-bench-images")
    args = parser.parse_args()

    make_images(args.folder, args.images)
    dataset = torch.utils.data.Subset(Folder(args.folder, args.size), range(args.images))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    print(f"resnet50 layer3 (avg-pooled), {args.images} JPEGs at {args.size}, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    contenders = {"fxtap.extract": run_fxtap, "hand loop (truncated model)": run_hand, "hook recipe (whole model)": run_hooks}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = list(contenders)[round_ % len(contenders) :] + list(contenders)[: round_ % len(contenders)]
            for name in order:
                out = Path(scratch) / f"{name.split()[0]}-{round_}"
                out.mkdir()
                times[name].append(timed(lambda name=name, out=out: contenders[name](model, loader, out)))
                print(f"  round {round_ + 1}: {name}: {args.images / times[name][-1]:.1f} images/s", flush=True)
        hand = statistics.median(times["hand loop (truncated model)"])
        print("\nend to end (median over rounds)")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:30s} {args.images / median:7.1f} images/s  {hand / median:5.3f}x the hand loop")
        ratio = hand / statistics.median(times["fxtap.extract"])
        print(f"  target fxtap >= 0.95x the hand loop: {'met' if ratio >= 0.95 else 'NOT met'} ({ratio:.3f}x)")
        where_the_time_goes(model, loader, args, Path(scratch))


def where_the_time_goes(model: nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace, scratch: Path) -> None:
    """Each part alone, for the whole folder: decoding once; the forwards interleaved round by
    round (rotated order, medians) on the decoded batches; writing the rows once each way."""
    batches: list[torch.Tensor] = []
    decode = timed(lambda: batches.extend(images for images, _ in loader))
    trunk, tapped = truncated(model), fxtap.tap(model, ["layer3"], detach=True)
    forwards: dict[str, Callable[[torch.Tensor], object]] = {
        "truncated model": lambda images: trunk(images).mean(dim=(2, 3)),
        "fxtap tapped": lambda images: tapped(images)["layer3"].mean(dim=(2, 3)),
        "whole model": model,
    }
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.no_grad():
        tapped(batches[0][:1])  # the first call traces: not part of the steady forward
        for round_ in range(args.rounds):
            order = list(forwards)[round_ % 3 :] + list(forwards)[: round_ % 3]
            for name in order:
                seconds[name].append(timed(lambda name=name: [forwards[name](images) for images in batches]))
    rows = torch.randn(args.images, 1024)
    write_fxtap = timed(lambda: fxtap._features.write_shard(scratch, 0, config={}, inputs=None, tensors={"layer3": rows},
                                                             ids=list(range(args.images)), skipped=[], features={}))  # fmt: skip
    write_torch = timed(lambda: torch.save({"layer3": rows}, scratch / "rows.pt"))
    print("\nwhere the time goes (seconds for the whole folder, each part alone; forwards: median over rounds)")
    print(f"  decode + preprocess ({args.workers} workers, no model): {decode:7.2f}")
    truncated_time = statistics.median(seconds["truncated model"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  forward, {name:20s}:               {median:7.2f}  ({median / truncated_time:.3f}x the truncated model)")
    print(f"  write: fxtap shard {write_fxtap:.3f}, torch.save {write_torch:.3f}")


if __name__ == "__main__":
    main()
