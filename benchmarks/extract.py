"""End-to-end extraction speed: ``fxtap.extract`` against a hand-written loop, side by side.

    python benchmarks/extract.py [--images 1000] [--size 224] [--batch-size 32] [--workers 2] [--rounds 2] [--subset 64]

Writes ``--images`` JPEGs (320x240, made with PIL, not committed) to ``--folder`` once, then, round
by round and in a rotated order, runs three ways to store resnet50's ``layer3`` average-pooled
over the folder, each reading it with the same ``DataLoader`` (``--workers`` decoding processes):

- fxtap: ``fxtap.extract(model, ["layer3"], loader, out)`` (shards, manifest, resume key);
- hand loop: a truncated ``nn.Sequential`` up to ``layer3``, pooled, ``torch.save`` at the end;
- hook recipe: a forward hook on ``layer3`` of the whole model (which runs layer4 and fc too);
- thingsvision (when installed): ``get_extractor_from_model`` with a mean-pooling ``flatten_fn``,
  ``extract_features(loader, module_name="layer3", flatten_acts=True)``, then ``torch.save``;
- TorchLens (when installed): ``torchlens.extract_dataset(model, items, ["layer3"],
  pool="spatial_mean", output_dir=...)`` over the same decoded items (``--workers`` processes).
  TorchLens logs every op of the forward: it runs over the first ``--subset`` images only
  (images/s are comparable; the folder's count is not).

thingsvision pins numpy<2 and old torch/torchvision/transformers; run this script from a venv that
holds it beside this torch (``pip install --no-deps thingsvision`` there) to include it. A
library that is not installed is skipped with a line saying so.

It prints images/s (median over rounds) and each ratio to the hand loop (target: fxtap >= 0.95x),
then where the time goes: decoding alone (the loader with no model), the forward alone (on
batches already in memory, truncated model and fxtap's tapped model), and writing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
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
        self.folder, self.size = folder, size
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


def run_thingsvision(model: nn.Module, loader: torch.utils.data.DataLoader, out: Path) -> None:
    from thingsvision import get_extractor_from_model  # type: ignore[import-not-found]

    extractor = get_extractor_from_model(model=model, device="cpu", backend="pt", flatten_fn=lambda self, act: act.mean(dim=(2, 3)))
    features = extractor.extract_features(batches=loader, module_name="layer3", flatten_acts=True, output_type="tensor")
    torch.save({"layer3": features, "ids": list(range(len(features)))}, out / "features.pt")


class _ImagesOnly(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, dataset: torch.utils.data.Dataset[tuple[torch.Tensor, int]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


def run_torchlens(model: nn.Module, loader: torch.utils.data.DataLoader, out: Path) -> float:
    """TorchLens in a fresh interpreter (a subprocess running this script): in a process where
    fxtap has traced a model, TorchLens 2.36's capture fails with a RecursionError (cause not
    found; fxtap changes no torch attribute, global hook or mode that we could find), and TorchLens
    refuses to capture in a multiprocessing child. Returns the seconds of the ``extract_dataset``
    call alone, as the child measured them."""
    folder = loader.dataset.dataset.dataset  # Subset(Subset(Folder))
    command = [sys.executable, __file__, "--torchlens-child", str(out), "--folder", str(folder.folder), "--size", str(folder.size),
               "--images", str(len(loader.dataset)), "--batch-size", str(loader.batch_size), "--workers", str(loader.num_workers)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"TorchLens failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.split()[-1])


def torchlens_child(args: argparse.Namespace) -> None:
    import torchlens  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    items = torch.utils.data.DataLoader(_ImagesOnly(torch.utils.data.Subset(Folder(args.folder, args.size), range(args.images))),
                                        batch_size=None, num_workers=args.workers)  # fmt: skip  (TorchLens makes the batches)
    start = time.perf_counter()
    torchlens.extract_dataset(model, items, ["layer3"], batch_size=args.batch_size, output_dir=Path(args.torchlens_child) / "torchlens",
                              pool="spatial_mean", progress=False)  # fmt: skip
    print(time.perf_counter() - start)


OPTIONAL = {"thingsvision": ("thingsvision", run_thingsvision), "torchlens": ("TorchLens", run_torchlens)}


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError as error:
        print(f"  {module}: not installed here, skipped ({error})")
        return False
    return True


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` took, or the seconds it returns (a contender timed in another process)."""
    start = time.perf_counter()
    seconds = fn()
    return seconds if isinstance(seconds, float) else time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--subset", type=int, default=64, help="images for the slow contenders (TorchLens)")
    parser.add_argument("--skip", nargs="*", default=[], help="optional contenders to leave out: thingsvision torchlens")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fxtap-bench-images")
    parser.add_argument("--torchlens-child", help=argparse.SUPPRESS)  # run TorchLens alone, writing there; print its seconds
    args = parser.parse_args()
    if args.torchlens_child:
        torchlens_child(args)
        return

    make_images(args.folder, args.images)
    dataset = torch.utils.data.Subset(Folder(args.folder, args.size), range(args.images))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    print(f"resnet50 layer3 (avg-pooled), {args.images} JPEGs at {args.size}, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    contenders = {"fxtap.extract": run_fxtap, "hand loop (truncated model)": run_hand, "hook recipe (whole model)": run_hooks}
    counts = dict.fromkeys(contenders, args.images)
    subset = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(min(args.subset, args.images))), batch_size=args.batch_size,
                                         num_workers=args.workers)  # fmt: skip
    loaders = dict.fromkeys(contenders, loader)
    for module, (label, fn) in OPTIONAL.items():
        if module not in args.skip and installed(module):
            name = f"{label} {sys.modules[module].__version__}"
            contenders[name] = fn
            counts[name] = args.images if module == "thingsvision" else len(subset.dataset)  # type: ignore[arg-type]
            loaders[name] = loader if module == "thingsvision" else subset
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = list(contenders)[round_ % len(contenders) :] + list(contenders)[: round_ % len(contenders)]
            for name in order:
                out = Path(scratch) / f"{name.split()[0]}-{round_}"
                out.mkdir()
                times[name].append(timed(lambda name=name, out=out: contenders[name](model, loaders[name], out)))
                print(f"  round {round_ + 1}: {name}: {counts[name] / times[name][-1]:.1f} images/s ({counts[name]} images)", flush=True)
        hand = args.images / statistics.median(times["hand loop (truncated model)"])
        print("\nend to end (median over rounds)")
        for name, values in times.items():
            rate = counts[name] / statistics.median(values)
            print(f"  {name:30s} {rate:7.1f} images/s  {rate / hand:5.3f}x the hand loop" + ("" if counts[name] == args.images else f"  (on {counts[name]} images)"))
        hand = statistics.median(times["hand loop (truncated model)"])
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
