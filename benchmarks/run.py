"""fxtap against the other ways to get activations, measured side by side in one process.

    pip install -e '.[bench]' && python benchmarks/run.py [--device cpu|cuda] [--rounds N] [--quick] [--no-write]

Every case times its contenders round by round, interleaved (A B C A B C ...), and reports
medians, so that noise on a shared machine hits all of them alike. Ratios, not absolute times,
are the result; the targets are checked and printed next to them. The tables also go to
docs/benchmarks.md and the scaling plot to docs/img/benchmarks.png (unless --no-write).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fxtap of this checkout, not whichever one is installed

import fxtap

Row = list[Any]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def minor_faults() -> int:
    """Page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(contenders: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each contender (see ``measure``)."""
    return measure(contenders, rounds, device)[0]


def measure(contenders: dict[str, Callable[[], Any]], rounds: int, device: str) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and median page faults per call of each contender, timed round by round in turn.

    The order rotates every round: a call pays for the allocator state the previous call left
    (glibc returns freed memory to the system and faults it in again; on ViT-B up to 10^5 page
    faults per call, and how many depends on which contender ran just before), so each contender
    runs after each other one equally often.
    """
    for fn in contenders.values():  # warm-up: first-call costs, caches, lazy graphs
        fn()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            before = minor_faults()
            start = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - before)
    median = statistics.median
    return {name: median(values) for name, values in times.items()}, {name: median(values) for name, values in faults.items()}


def hook_recipe(model: nn.Module, names: list[str]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The usual recipe: forward hooks storing ``output.detach()`` in a dict (hooks stay on)."""
    store: dict[str, torch.Tensor] = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, o.detach()))

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        model(x)
        return dict(store)

    return run


def model_and_input(arch: str, batch: int, device: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    return model, torch.randn(batch, 3, 224, 224, device=device)


STAGES = {
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)],
}
EARLY = {"resnet50": "layer2", "vit_b_16": "encoder.layers.encoder_layer_2"}


def truncated(arch: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model written out by hand up to the early tap: the fastest possible way to get it."""
    if arch == "resnet50":
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)

    def vit(x: torch.Tensor) -> torch.Tensor:
        x = model._process_input(x)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = model.encoder.dropout(x + model.encoder.pos_embedding)
        for layer in list(model.encoder.layers)[:3]:
            x = layer(x)
        return x

    return vit


def tap(model: nn.Module, names: list[str], mode: str) -> fxtap.Tapped:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        return fxtap.tap(model, names, mode=mode)  # type: ignore[arg-type]


def case_stages(arch: str, batch: int, rounds: int, device: str) -> list[Row]:
    model, x = model_and_input(arch, batch, device)
    names = STAGES[arch]
    contenders = {
        "plain forward": lambda: model(x),
        "torchvision": lambda fe=create_feature_extractor(model, names): fe(x),
        "fxtap fx": lambda t=tap(model, names, "fx"): t(x),
        "fxtap hooks": lambda t=tap(model, names, "hooks"): t(x),
        "fxtap auto": lambda t=tap(model, names, "auto"): t(x),
    }
    recipe_model, _ = model_and_input(arch, batch, device)  # its hooks stay on: give it its own copy
    recipe_model.load_state_dict(model.state_dict())
    contenders = {"plain forward": contenders["plain forward"], "hook recipe": lambda r=hook_recipe(recipe_model, names): r(x), **contenders}
    with torch.inference_mode():
        med, faults = measure(contenders, rounds, device)
    base = med["plain forward"]
    return [
        [f"1. {arch} 4 stages", name, f"{t * 1000:.1f}", f"{t / base:.3f}", "<= 1.02" if name == "fxtap fx" else "", f"{faults[name]:.0f}"]
        for name, t in med.items()
    ]


def case_early(arch: str, batch: int, rounds: int, device: str) -> list[Row]:
    model, x = model_and_input(arch, batch, device)
    name = EARLY[arch]
    cut = truncated(arch, model)
    recipe_model, _ = model_and_input(arch, batch, device)
    recipe_model.load_state_dict(model.state_dict())
    contenders = {
        "hand-truncated": lambda: cut(x),
        "plain forward": lambda: model(x),
        "hook recipe": lambda r=hook_recipe(recipe_model, [name]): r(x),
        "torchvision": lambda fe=create_feature_extractor(model, [name]): fe(x),
        "fxtap fx": lambda t=tap(model, [name], "fx"): t(x),
        "fxtap hooks": lambda t=tap(model, [name], "hooks"): t(x),
    }
    with torch.inference_mode():
        med, faults = measure(contenders, rounds, device)
    base = med["hand-truncated"]
    target = {"fxtap fx": "<= 1.05", "fxtap hooks": "<= 1.10"}
    return [
        [f"2. {arch} early tap ({name})", n, f"{t * 1000:.1f}", f"{t / base:.3f}", target.get(n, ""), f"{faults[n]:.0f}"]
        for n, t in med.items()
    ]


def case_build(arch: str, rounds: int) -> list[Row]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    names = {"resnet50": STAGES["resnet50"], "vit_b_16": STAGES["vit_b_16"], "swin_t": ["features.1", "features.3", "features.5", "features.7"]}[arch]
    med = interleaved(
        {"torchvision": lambda: create_feature_extractor(model, names), "fxtap.tap": lambda: tap(model, names, "auto")},
        rounds,
        "cpu",
    )
    base = med["torchvision"]
    return [[f"3. build {arch}", n, f"{t * 1000:.1f}", f"{t / base:.3f}", "<= 0.6" if n == "fxtap.tap" else ""] for n, t in med.items()]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


def case_scale(depths: list[int], rounds: int) -> tuple[list[Row], dict[int, tuple[float, float]]]:
    rows: list[Row] = []
    results: dict[int, tuple[float, float]] = {}
    for depth in depths:
        torch.manual_seed(0)
        model = nn.Sequential(*[_Block(16) for _ in range(depth)]).eval()
        names = [str(depth // 4), str(depth // 2), str(depth - 1)]
        x = torch.randn(4, 16)
        build = interleaved({"build": lambda: tap(model, names, "fx")}, max(3, rounds // 2), "cpu")["build"]
        tapped = tap(model, names, "fx")
        with torch.inference_mode():
            med = interleaved({"plain": lambda: model(x), "fxtap fx": lambda: tapped(x)}, rounds, "cpu")
        overhead = med["fxtap fx"] / med["plain"]
        results[depth] = (build, overhead)
        rows.append([f"4. residual MLP depth {depth}", "fxtap.tap build / forward ratio", f"{build * 1000:.1f}", f"{overhead:.3f}", ""])
    ratio = results[depths[-1]][0] / results[depths[1]][0]
    rows.append([f"4. build time({depths[-1]}) / time({depths[1]})", "fxtap.tap", "", f"{ratio:.2f}", f"<= {4.5 * depths[-1] / depths[1] / 4:.1f}"])
    return rows, results


def case_memory(arch: str, batch: int, device: str) -> list[Row]:
    model, x = model_and_input(arch, batch, device)
    names = STAGES[arch]
    tapped = tap(model, names, "fx")
    with torch.inference_mode():
        out = tapped(x)
    requested = sum(v.numel() * v.element_size() for v in out.values())
    graph = tapped.graph_module()
    own = {id(t) for t in list(graph.parameters()) + list(graph.buffers())} - {id(t) for t in list(model.parameters()) + list(model.buffers())}
    copies = sum(1 for n in graph.graph.nodes if n.op == "call_function" and n.target is fxtap._values.copy_value)
    fe = create_feature_extractor(model, names)
    with torch.inference_mode():
        tv = fe(x)
    tv_bytes = sum(v.numel() * v.element_size() for v in tv.values())
    return [
        [f"5. memory {arch}", "fxtap: bytes returned", f"{requested / 2**20:.1f} MiB", "1.000", "only the requested tensors"],
        [f"5. memory {arch}", "fxtap: tensors held by the graph", str(len(own)), "", "0 (parameters are shared)"],
        [f"5. memory {arch}", "fxtap: snapshot copies per call", str(copies), "", "only what in-place ops overwrite"],
        [f"5. memory {arch}", "torchvision: bytes returned", f"{tv_bytes / 2**20:.1f} MiB", f"{tv_bytes / requested:.3f}", ""],
    ]


def case_edit(arch: str, batch: int, rounds: int, device: str) -> list[Row]:
    """One value edited (a steering vector added to ``layer3``): fxtap.edit's graph and hooks, and a
    hand-written forward hook returning the replacement, against the plain forward."""
    model, x = model_and_input(arch, batch, device)
    name = "layer3"
    vector = torch.randn(model.get_submodule(name)[-1].conv3.out_channels, 1, 1, device=device)

    def steer(value: torch.Tensor) -> torch.Tensor:
        return value + vector

    recipe_model, _ = model_and_input(arch, batch, device)  # its hook stays on: give it its own copy
    recipe_model.load_state_dict(model.state_dict())
    recipe_model.get_submodule(name).register_forward_hook(lambda module, args, output: steer(output))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        by_graph = fxtap.edit(model, {name: steer}, mode="fx")
        by_hooks = fxtap.edit(model, {name: steer}, mode="hooks")
    contenders = {
        "plain forward": lambda: model(x),
        "hook recipe (edit)": lambda: recipe_model(x),
        "fxtap.edit fx": lambda: by_graph(x),
        "fxtap.edit hooks": lambda: by_hooks(x),
    }
    with torch.inference_mode():
        med, faults = measure(contenders, rounds, device)
    base = med["plain forward"]
    return [
        [f"6. {arch} edit one value ({name})", n, f"{t * 1000:.1f}", f"{t / base:.3f}", "<= 1.02" if n == "fxtap.edit fx" else "", f"{faults[n]:.0f}"]
        for n, t in med.items()
    ]


def case_guard(batch: int, rounds: int, device: str) -> list[Row]:
    """What keeping the graph current costs per call: the guard check (fxtap/_capture/guard.py)
    next to the whole tapped call it precedes, on resnet50 and on a 2,000-block residual MLP."""
    rows: list[Row] = []
    torch.manual_seed(0)
    mlp = nn.Sequential(*[_Block(16) for _ in range(2000)]).eval()
    resnet, x = model_and_input("resnet50", batch, device)
    cases = [("resnet50 4 stages", resnet, STAGES["resnet50"], x), ("residual MLP depth 2000", mlp, ["500", "1000", "1999"], torch.randn(4, 16))]
    for label, model, names, inputs in cases:
        tapped = tap(model, names, "fx")
        tapped(inputs)
        guard = tapped.graph_module().meta["fxtap_guard"]
        checks = [guard.check] * 100  # timed 100 at a time: one check is shorter than the timer's own overhead
        with torch.inference_mode():
            med = interleaved({"tapped call": lambda t=tapped, i=inputs: t(i), "100 guard checks": lambda c=checks: [f() for f in c]}, rounds, device)
        per_check = med["100 guard checks"] / 100
        ratio = per_check / med["tapped call"]
        rows.append([f"6. guard {label}", "guard check / tapped call", f"{per_check * 1e6:.1f} us", f"{ratio * 100:.2f}%", "<= 1%"])
    return rows


def case_export(batch: int, rounds: int, device: str, quick: bool = False) -> list[Row]:
    """The torch.export frontend on every Hugging Face model of the matrix (benchmarks/hf_models.py:
    4 layers of width 256, random weights, 8 x 128 tokens or 8 images of 224 x 224; width 64 and
    16 tokens with --quick), each layer's output tapped: build cost (``tap()`` and the calls until
    the graph serves, the export frontend against mixed mode alone) and the forward of a tapped
    call against a plain call of the model, side by side per model."""
    import contextlib
    from unittest import mock

    from hf_models import BENCHES, layers

    from fxtap._capture import export as frontend

    width, length = (64, 16) if quick else (256, 128)  # --quick: a smoke run

    def mixed_only() -> Any:
        return mock.patch.object(frontend, "applies", lambda placement, mode: False)  # today's mixed mode, for comparison

    rows: list[Row] = []
    for bench in BENCHES:
        model = bench.build(width).to(device)
        inputs = bench.inputs(batch, length, device)
        names = layers(model) + list(bench.extra)

        def built(exported: bool) -> fxtap.Tapped:
            with mixed_only() if not exported else contextlib.nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore", fxtap.FallbackWarning)
                tapped = fxtap.tap(model, names, keep_output=bench.keep_output)  # noqa: B023 - called in this iteration
                tapped(*inputs)  # noqa: B023 - the first call: mixed mode, and the export
                tapped(*inputs)  # noqa: B023
            return tapped

        with torch.no_grad():
            build = interleaved({"mixed mode": lambda: built(False), "export frontend": lambda: built(True)}, max(2, rounds // 2), device)
            exported, mixed = built(True), built(False)
            assert exported.mode == "export" and mixed.mode in ("mixed", "hooks"), (bench.name, exported.mode, mixed.mode, exported.report())
            calls = interleaved(
                {"plain model": lambda: model(*inputs), "mixed mode": lambda: mixed(*inputs), "export frontend": lambda: exported(*inputs)},  # noqa: B023
                rounds, device,
            )  # fmt: skip
            served = exported._last_runner().last  # the graph's check of the tensors it baked in (model.to(dtype))
            checks = [lambda e=served: frontend.metas_hold(e.baked)] * 100  # 100 at a time: one is shorter than the timer
            metas = interleaved({"export frontend": lambda: exported(*inputs), "100 checks": lambda c=checks: [f() for f in c]}, rounds, device)  # noqa: B023
        shape = "x".join(map(str, inputs[0].shape))
        label = f"7. {bench.name} ({width} wide, {shape})"
        per_check = metas["100 checks"] / 100
        rows.append([f"{label} tensor check", "check / export call", f"{per_check * 1e6:.1f} us", f"{per_check / metas['export frontend'] * 100:.2f}%", "<= 1%"])
        rows += [[f"{label} build", n, f"{t * 1000:.1f}", f"{t / build['mixed mode']:.2f}", ""] for n, t in build.items()]
        targets = {"export frontend": "<= 1.05"}
        rows += [[f"{label} forward", n, f"{t * 1000:.1f}", f"{t / calls['plain model']:.3f}", targets.get(n, "")] for n, t in calls.items()]
        print(f"{label}: build {build['export frontend'] / build['mixed mode']:.2f}x mixed mode, forward "
              f"{calls['export frontend'] / calls['plain model']:.3f}x plain, load {load()}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def case_eager_ops(batch: int, rounds: int, device: str, quick: bool = False) -> list[Row]:
    """What naming the own ops of eagerly run code costs per call (fxtap/_capture/eager_ops.py: a
    ``TorchFunctionMode`` sees every torch call of the tapped call): GPT2Model of case 7 in mixed
    mode (the export frontend off, as when export is refused), its layers tapped, with and without
    the root's own ops (``view``, ``to``...), side by side with a plain call."""
    from unittest import mock

    from hf_models import BENCHES, layers

    from fxtap._capture import export as frontend

    width, length = (64, 16) if quick else (256, 128)  # --quick: a smoke run
    bench = next(b for b in BENCHES if b.name == "GPT2Model")
    model = bench.build(width).to(device)
    inputs = bench.inputs(batch, length, device)
    modules = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        root_ops = [n for n in fxtap.names(model, inputs) if n.split(".")[0] not in modules and n not in ("input_ids",)]
        assert root_ops, "GPT2Model's root names no op"
        with mock.patch.object(frontend, "applies", lambda placement, mode: False):  # mixed mode only
            plain_names = fxtap.tap(model, layers(model))
            with_ops = fxtap.tap(model, layers(model) + root_ops)
            for tapped in (plain_names, with_ops):
                tapped(*inputs), tapped(*inputs)
            assert plain_names.mode == with_ops.mode == "mixed", (plain_names.mode, with_ops.mode)
            with torch.no_grad():
                med = interleaved(
                    {"plain model": lambda: model(*inputs), "mixed, layers": lambda: plain_names(*inputs),
                     f"mixed, layers + {len(root_ops)} root ops": lambda: with_ops(*inputs)},
                    rounds, device,
                )  # fmt: skip
    label = f"8. eager op names, GPT2Model ({width} wide, {'x'.join(map(str, inputs[0].shape))}) forward"
    return [[label, n, f"{t * 1000:.1f}", f"{t / med['plain model']:.3f}", ""] for n, t in med.items()]


def load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes (``uptime``), or "?" where unknown."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "?"


def plot(results: dict[int, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(results)
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(depths, [results[d][0] for d in depths], "o-", label="fxtap.tap build time (s)")
    left.set_xlabel("residual blocks")
    left.set_ylabel("build time (s)")
    right = left.twinx()
    right.plot(depths, [results[d][1] for d in depths], "s--", color="tab:orange", label="forward time / plain")
    right.set_ylabel("forward ratio to plain model")
    right.set_ylim(0.8, 1.3)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 1, fewer rounds and depths: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--only", choices=["guard", "edit", "export", "eager_ops"], help="run only these rows (and print them; docs/ is left alone)")
    parser.add_argument("--write-export", action="store_true", help="with --only export: put case 7 into docs/benchmarks.md, the rest as it is")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch's intra-op threads (default: all)")
    args = parser.parse_args(argv)
    batch = 1 if args.quick else 8
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    headers = ["case", "contender", "median", "ratio", "target", "page faults/call"]
    if args.only == "guard":
        from fxtap._text import table

        print(table(headers[:5], case_guard(batch, rounds, args.device)))
        return 0
    if args.only == "eager_ops":
        from fxtap._text import table

        print(table(headers[:5], case_eager_ops(batch, rounds, args.device, args.quick)))
        return 0
    rows: list[Row] = []
    if args.only == "export":
        from fxtap._text import table

        before = load()
        rows = case_export(batch, rounds, args.device, args.quick)
        print(table(headers[:5], rows))
        if args.write_export:
            page = ROOT / "docs" / "benchmarks.md"
            kept = [line for line in page.read_text().split("\n") if not line.startswith("| 7. ")]  # case 7 of a full run
            text = "\n".join(kept).split(EXPORT_SECTION)[0].rstrip("\n")
            page.write_text(text + "\n\n" + export_section(rows, args, batch, before) + _after_export(page.read_text()))
        return 0
    if args.only == "edit":
        from fxtap._text import table

        print(table(["case", "contender", "median", "ratio", "target", "page faults/call"], case_edit("resnet50", batch, rounds, args.device)))
        return 0
    before = load()
    for arch in STAGES:
        rows += case_stages(arch, batch, rounds, args.device)
        rows += case_early(arch, batch, rounds, args.device)
    for arch in ("resnet50", "vit_b_16", "swin_t"):
        rows += case_build(arch, rounds)
    depths = [50, 100, 200] if args.quick else [250, 500, 1000, 2000]
    scale_rows, scale = case_scale(depths, rounds)
    rows += scale_rows
    rows += case_memory("resnet50", batch, args.device)
    rows += case_edit("resnet50", batch, rounds, args.device)
    rows += case_guard(batch, rounds, args.device)
    rows += case_export(batch, rounds, args.device, args.quick)
    rows += case_eager_ops(batch, rounds, args.device, args.quick)
    from fxtap._text import table

    print(table(headers, rows))
    if not args.no_write:
        write_docs(headers, rows, args, batch, before)
        plot(scale, ROOT / "docs" / "img" / "benchmarks.png")
    return 0


def write_docs(headers: list[str], rows: list[Row], args: argparse.Namespace, batch: int, before: str) -> None:
    from tabulate import tabulate

    export_rows = [row for row in rows if str(row[0]).startswith("7. ")]
    rows = [row for row in rows if row not in export_rows]

    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    text = [
        "# Benchmarks",
        "",
        "Made by `python benchmarks/run.py`; every number below comes from one run of that script, with",
        "the contenders of each case timed round by round, interleaved, and reported as medians (ms for",
        "calls, ratios to the case's baseline: the plain model, the hand-truncated model, or torchvision).",
        "On a shared 2-core machine ratios move by a few percent from run to run; compare runs, not digits.",
        "The order of the contenders rotates every round: glibc gives freed memory back to the system",
        "and each call faults it in again (the page-fault column, medians per call), and how much",
        "depends on the allocations of the call that ran just before, so a fixed order favours some",
        "contenders by a few percent on ViT-B.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.system()} {platform.machine()}, {device}, {torch.get_num_threads()} threads, device `{args.device}`",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, fxtap {fxtap.__version__}, Python {sys.version.split()[0]}",
        f"- batch {batch}, 224x224 inputs, `torch.inference_mode()`, {args.rounds if not args.quick else 2} rounds",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        "Case 4 (build time and forward overhead of a generated residual MLP):",
        "",
        "![scaling](img/benchmarks.png)",
        "",
        export_section(export_rows, args, batch, before),
    ]
    page = ROOT / "docs" / "benchmarks.md"
    page.write_text("\n".join(text) + _after_export(page.read_text() if page.exists() else ""))


def _after_export(page: str) -> str:
    """The sections of docs/benchmarks.md after case 7 (case 8, the CUDA check), which other runs
    write: a run that writes case 7 keeps them."""
    _, found, rest = page.partition(EXPORT_SECTION)
    _, header, after = rest.partition("\n## ")
    return "\n" + header.lstrip("\n") + after if found and header else ""


EXPORT_SECTION = "## Case 7: Hugging Face models, the torch.export frontend"


def export_section(rows: list[Row], args: argparse.Namespace, batch: int, before: str) -> str:
    """Case 7's part of docs/benchmarks.md: a full run writes it, and so does ``--only export --write-export``."""
    from tabulate import tabulate

    return "\n".join([
        EXPORT_SECTION,
        "",
        "Every Hugging Face model of the model matrix (docs/models.md; `benchmarks/hf_models.py`: random",
        "weights, 4 layers of width 256, 8 sequences of 128 tokens or 8 images of 224 x 224), each",
        "layer's output tapped (and the model's output with its `DynamicCache` for the `+cache`, Mistral",
        "and Qwen2 rows). **build**: `fxtap.tap()` and the two calls after which the graph serves, the",
        "torch.export frontend against mixed mode alone (`export.applies` patched off), the ratio to",
        "mixed mode. **forward**: a tapped call against a plain call of the model, under `torch.no_grad()`",
        "(the export frontend is not used in inference mode), the ratio to the plain call. No padding mask",
        "is passed, so transformers builds no attention mask in eager code, and none in fxtap's graphs",
        "(docs/fallback.md). The load average is printed because on a loaded machine one model's ratio",
        "moves by several percent from run to run: compare runs, not digits.",
        "",
        f"- date: {datetime.date.today().isoformat()}; `python benchmarks/run.py --only export --write-export --threads {args.threads} --rounds {args.rounds}`"
        if args.only else f"- date: {datetime.date.today().isoformat()}; the full run above",
        f"- {torch.get_num_threads()} thread(s), batch {batch}, {args.rounds if not args.quick else 2} rounds (build: half as many)",
        f"- load average (1, 5, 15 min) before: {before}; after: {load()}",
        "",
        tabulate(rows, headers=["case", "contender", "median", "ratio", "target"], tablefmt="github", disable_numparse=True),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
