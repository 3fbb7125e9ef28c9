"""fxtap's CUDA paths against eager on one device: one line per check, and a JSON summary.

    PYTHONPATH=. python benchmarks/cuda_check.py --device cuda --out cuda_check.json [--only NAME ...]

Each check runs the model eagerly (forward hooks that clone, or the model's code run by hand)
and through fxtap on the same device, with cuDNN deterministic and TF32 off, and prints
``OK name detail``, ``FAIL name detail`` or ``SKIP name why``, with its time. ``--device cpu``
is the dry run (checks that need CUDA are skipped). Exit code 0 whatever the checks say;
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from config objects: nothing to download

import torch
from torch import nn

try:
    import fxtap
except Exception as error:  # noqa: BLE001 - reported as the check "import_fxtap", with a JSON summary
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None

RTOL = ATOL = 1e-5  # float32: |tapped - eager| <= ATOL + RTOL * max|eager|
DEV = torch.device("cpu")
CHECKS: list[tuple[str, Callable[[], str], bool]] = []  # name, function, needs CUDA


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Fail(Exception):
    """A value differs from eager; the message says which and by how much."""


def check(name: str, cuda_only: bool = False) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        CHECKS.append((name, fn, cuda_only))
        return fn

    return register


# -- helpers ---------------------------------------------------------------------------------------
def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a value (tensor, tuple, list, dict, transformers ModelOutput), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in leaves(v)]
    return []


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)({k: clone(v) for k, v in value.items()}) if type(value) is dict else {k: clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(clone(v) for v in value) if type(value) in (tuple, list) else tuple(clone(v) for v in value)
    return value


class Diffs:
    """Compares values with eager and remembers the largest difference."""

    def __init__(self, rtol: float = RTOL, atol: float = ATOL) -> None:
        self.rtol, self.atol, self.worst, self.count, self.exact = rtol, atol, 0.0, 0, True

    def __call__(self, what: str, actual: Any, expected: Any) -> None:
        got, want = leaves(actual), leaves(expected)
        if len(got) != len(want) or not want:
            raise Fail(f"{what}: {len(got)} tensors, eager has {len(want)}")
        for a, e in zip(got, want):
            if a.shape != e.shape or a.dtype != e.dtype or a.device != e.device:
                raise Fail(f"{what}: {tuple(a.shape)} {a.dtype} {a.device}, eager {tuple(e.shape)} {e.dtype} {e.device}")
            self.count += 1
            if torch.equal(a, e):
                continue
            self.exact = False
            a64, e64 = a.detach().double(), e.detach().double()
            diff = (a64 - e64).abs().max().item() if a.numel() else 0.0
            self.worst = max(self.worst, diff)
            scale = e64.abs().max().item() if e.numel() else 0.0
            if not (diff <= self.atol + self.rtol * scale):  # also catches nan
                raise Fail(f"{what}: max|d|={diff:.3g} (max|eager|={scale:.3g}, allowed {self.atol + self.rtol * scale:.3g})")

    def __str__(self) -> str:
        return f"{self.count} tensors bitwise equal" if self.exact else f"{self.count} tensors, max|d|={self.worst:.3g}"


def hook_values(model: nn.Module, paths: list[str], *args: Any, replace: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The eager truth: each module's output cloned as it returns, and the output; ``replace``
    swaps a module's output for a value, or for ``fn(output)``."""
    out: dict[str, Any] = {}
    replace = replace or {}
    handles = []
    for path in set(paths) | set(replace):
        def hook(module: nn.Module, inputs: Any, output: Any, path: str = path) -> Any:
            new = replace.get(path)
            new = new(output) if callable(new) and not isinstance(new, torch.Tensor) else new
            if path in paths:
                out[path] = clone(output if new is None else new)
            return new

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        out["output"] = clone(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return out


def rng_state() -> torch.Tensor:
    return torch.cuda.get_rng_state(DEV) if DEV.type == "cuda" else torch.get_rng_state()


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackWarning (expected on the hook and export paths), deprecations
        return fn(*args, **kwargs)


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().to(DEV)


def hf(kind: str, **config: Any) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0, **config)
        return transformers.GPT2Model(cfg).eval().to(DEV)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, **config)  # fmt: skip
    return transformers.BertModel(cfg).eval().to(DEV)


def tokens(batch: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 100, (batch, length), device=DEV)


# -- checks ----------------------------------------------------------------------------------------
@check("fx_resnet18")
def fx_resnet18() -> str:
    model, d = resnet18(), Diffs()
    x = torch.randn(8, 3, 64, 64, device=DEV)
    names = ["bn1", "relu", "layer1.0.add", "layer1.0.relu_1", "layer2", "layer4.1.bn2"]
    tapped = fxtap.tap(model, names)
    with torch.no_grad():
        truth = hook_values(model, ["bn1", "relu", "layer1.0.bn2", "layer1.0", "layer2", "layer4.1.bn2"], x)
        block_in = model.maxpool(truth["relu"])  # layer1.0's input: the identity of its residual sum
        truth["layer1.0.add"], truth["layer1.0.relu_1"] = truth["layer1.0.bn2"] + block_in, truth["layer1.0"]
        for call in (1, 2):
            out = tapped(x)
            for name in names:
                d(f"call {call} {name}", out[name], truth[name])
    if tapped.mode != "fx" or set(tapped.paths.values()) != {"fx"} or "fx" not in tapped.report():
        raise Fail(f"mode {tapped.mode!r}, paths {set(tapped.paths.values())}")
    if (truth["bn1"] >= 0).all():
        raise Fail("bn1 has no negative value: the in-place ReLU overwrite is not exercised")
    return f"mode fx; {d}"


class Branchy(nn.Module):
    """A block whose forward branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.mean() > -10:  # data-dependent Python branch
            y = self.act(y) * 2
        return y + x


@check("hooks_fallback")
def hooks_fallback() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Branchy(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval().to(DEV)
    x, d = torch.randn(8, 3, 16, 16, device=DEV), Diffs()
    names = ["0", "1.bn", "1.act", "1", "3"]
    with torch.no_grad():
        truth = hook_values(model, names, x)
        auto = quiet(fxtap.tap, model, names)
        hooks = fxtap.tap(model, names, mode="hooks")
        for call in (1, 2):
            for label, tapped in (("auto", auto), ("hooks", hooks)):
                out = quiet(tapped, x)
                for name in names:
                    d(f"{label} call {call} {name}", out[name], truth[name])
    if auto.paths["1.bn"] != "hook" or auto.paths["0"] != "fx" or hooks.mode != "hooks":
        raise Fail(f"paths {auto.paths}, hooks mode {hooks.mode!r}")
    block, y = model[1], model[0](x).detach()  # the untraceable block as the root: torch.export cannot record its branch either
    with torch.no_grad():
        truth = hook_values(block, ["conv", "bn", "act"], y)
        root = quiet(fxtap.tap, block, ["conv", "bn", "act"], keep_output=True)
        for call in (1, 2, 3):
            out = quiet(root, y)
            for name in ["conv", "bn", "act", "output"]:
                d(f"root call {call} {name}", out[name], truth[name])
    return f"auto {auto.mode} {sorted(set(auto.paths.values()))}, hooks, untraceable root {root.mode}; {d}"


def export_check(kind: str, names: list[str], x: torch.Tensor, **kwargs: Any) -> str:
    model, d = hf(kind), Diffs()
    with torch.no_grad():
        truth = hook_values(model, names, x, **kwargs)
        tapped = quiet(fxtap.tap, model, names, keep_output=True)
        modes = []
        for call in (1, 2, 3):
            out = quiet(tapped, x, **kwargs)
            modes.append(tapped.mode)
            for name in [*names, "output"]:
                d(f"call {call} {name}", out[name], truth[name])
    if tapped.mode != "export":
        report = " | ".join(line.strip() for line in tapped.report().splitlines() if "export" in line.lower())[:300]
        raise Skip(f"values equal eager ({d}) but modes {modes}: export not used: {report or tapped.report()[:300]}")
    return f"modes {modes}; {d}"


@check("export_gpt2")
def export_gpt2() -> str:
    return export_check("gpt2", ["h.0", "h.1", "ln_f"], tokens())


@check("export_bert")
def export_bert() -> str:
    mask = torch.ones(4, 16, dtype=torch.long, device=DEV)
    mask[:, 12:] = 0
    return export_check("bert", ["embeddings", "encoder.layer.0", "encoder.layer.1.output"], tokens(), attention_mask=mask)


def rng_pair(model: nn.Module, paths: list[str], tapped: nn.Module, calls: int, *args: Any) -> tuple[Diffs, list[str]]:
    """Eager and tapped calls under one seed each: values and the generator state after the call."""
    d, modes = Diffs(), []
    for call in range(1, calls + 1):
        torch.manual_seed(call)
        truth = hook_values(model, paths, *args)
        after_eager = rng_state()
        torch.manual_seed(call)
        out = quiet(tapped, *args)
        if not torch.equal(rng_state(), after_eager):
            raise Fail(f"call {call}: RNG state after the tapped call differs from eager's ({getattr(tapped, 'mode', '?')})")
        for name in paths:
            d(f"call {call} {name}", out[name], truth[name])
        modes.append(getattr(tapped, "mode", "?"))
    return d, modes


@check("rng_fx")
def rng_fx() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 8)).train().to(DEV)
    x = torch.randn(32, 64, device=DEV)
    tapped = fxtap.tap(model, ["1", "2"])  # the last dropout runs although no tap needs it (it draws)
    with torch.no_grad():
        d, modes = rng_pair(model, ["1", "2"], tapped, 3, x)
    return f"modes {modes}; {d}"


@check("rng_export")
def rng_export() -> str:
    model = hf("gpt2").train()
    x = tokens()
    tapped = quiet(fxtap.tap, model, ["h.0", "h.1"])
    with torch.no_grad():
        d, modes = rng_pair(model, ["h.0", "h.1"], tapped, 3, x)
    if modes[-1] != "export":
        raise Skip(f"values and RNG equal eager ({d}), but modes {modes}: export not used")
    return f"modes {modes}; {d}"


@check("buffers_batchnorm")
def buffers_batchnorm() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).train().to(DEV)
    twin, d = copy.deepcopy(model), Diffs()
    tapped = fxtap.tap(model, ["1", "2"])  # the last batch norm updates its statistics although no tap needs it
    for call in range(1, 4):
        x = torch.randn(4, 3, 16, 16, device=DEV)
        with torch.no_grad():
            out, truth = tapped(x), hook_values(twin, ["1", "2"], x)
        for name in ["1", "2"]:
            d(f"call {call} {name}", out[name], truth[name])
    d("buffers", list(model.buffers()), list(twin.buffers()))
    if model[4].num_batches_tracked.item() != 3:
        raise Fail(f"num_batches_tracked {model[4].num_batches_tracked.item()}, expected 3")
    return f"mode {tapped.mode}; {d}"


@check("gradients")
def gradients() -> str:
    model, d = resnet18(), Diffs(rtol=1e-4)
    x = torch.randn(4, 3, 64, 64, device=DEV)
    tapped = fxtap.tap(model, ["layer1.0.add", "layer2"])
    grads = []
    for run in ("eager", "tapped"):
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        if run == "eager":
            stem = model.maxpool(model.relu(model.bn1(model.conv1(xg))))
            block = model.layer1[0]
            add = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem))))) + stem
            layer2 = model.layer2(model.layer1[1](block.relu(add.clone())))
        else:
            out = tapped(xg)
            add, layer2 = out["layer1.0.add"], out["layer2"]
        (add.square().mean() + layer2.sin().sum()).backward()
        grads.append([xg.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    d("gradients", grads[1], grads[0])
    return f"{len(grads[0])} gradients; {d}"


@check("edit_fx")
def edit_fx() -> str:
    model, d = resnet18(), Diffs()
    x, other = torch.randn(4, 3, 64, 64, device=DEV), torch.randn(4, 3, 64, 64, device=DEV)
    with torch.no_grad():
        cache = hook_values(model, ["layer2"], other)["layer2"]
        scaled = fxtap.edit(model, {"layer3": lambda v: v * 0.5})(x)
        d("edit fn", scaled, hook_values(model, [], x, replace={"layer3": lambda v: v * 0.5})["output"])
        patched = fxtap.edit(model, {"layer2": cache})(x)
        d("edit tensor", patched, hook_values(model, [], x, replace={"layer2": cache})["output"])
    return str(d)


@check("cut_fx")
def cut_fx() -> str:
    model, d = resnet18(), Diffs()
    x, other = torch.randn(4, 3, 64, 64, device=DEV), torch.randn(4, 3, 64, 64, device=DEV)
    head = fxtap.cut(model, ["layer3"], ["layer4.0", "output"])
    with torch.no_grad():
        feature = hook_values(model, ["layer3"], other)["layer3"]
        truth = hook_values(model, ["layer4.0"], x, replace={"layer3": feature})
        out = head(feature)
    d("layer4.0", out["layer4.0"], truth["layer4.0"])
    d("output", out["output"], truth["output"])
    return str(d)


@check("cut_export")
def cut_export() -> str:
    model, d = hf("bert"), Diffs()
    example = {"input_ids": tokens(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long, device=DEV)}
    upper = quiet(fxtap.cut, model, ["encoder.layer.0"], ["encoder.layer.1", "output"], example=example)
    x, other, mask = tokens(3, 11, seed=2), tokens(3, 11, seed=3), torch.ones(3, 11, dtype=torch.long, device=DEV)
    mask[0, 7:] = 0
    with torch.no_grad():
        hidden = hook_values(model, ["encoder.layer.0"], other, attention_mask=mask)["encoder.layer.0"]
        truth = hook_values(model, ["encoder.layer.1"], x, attention_mask=mask, replace={"encoder.layer.0": hidden})
        out = upper(hidden, attention_mask=mask)
    d("encoder.layer.1", out["encoder.layer.1"], truth["encoder.layer.1"])
    d("output", out["output"], truth["output"])
    return f"inputs {upper.inputs}; {d}"


@check("moved_to_cuda", cuda_only=True)
def moved_to_cuda() -> str:
    """Tapped (and called) on the CPU, then the model is moved to CUDA: the next calls run there."""
    global DEV
    cuda, d, modes = DEV, Diffs(), []
    DEV = torch.device("cpu")
    try:
        models = [(resnet18(), ["layer1.0.add", "layer2"], torch.randn(2, 3, 32, 32)), (hf("gpt2"), ["h.0", "h.1"], tokens())]
    finally:
        DEV = cuda
    for model, names, x in models:
        tapped = quiet(fxtap.tap, model, names)
        with torch.no_grad():
            for _ in range(2):
                quiet(tapped, x)  # the FX graph; GPT2: mixed mode, then its export graph, on the CPU
            model.to(DEV)
            x = x.to(DEV)
            truth = hook_values(model, [n for n in names if n != "layer1.0.add"], x)
            for call in (1, 2):
                out = quiet(tapped, x)
                modes.append(tapped.mode)
                for name in names:
                    if name != "layer1.0.add":
                        d(f"{type(model).__name__} call {call} {name}", out[name], truth[name])
                    elif out[name].device != x.device:
                        raise Fail(f"{name} on {out[name].device}")
    return f"modes {modes}; {d}"


def extract_check(dtype: torch.dtype | None, tol: float) -> str:
    import torchvision

    torch.manual_seed(0)
    model, d = torchvision.models.resnet18(weights=None, num_classes=10).eval().to(DEV), Diffs(rtol=tol, atol=tol)
    images = torch.randn(64, 3, 64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=8)
    names = ["layer1.0.add", "layer2", "layer4"]
    with tempfile.TemporaryDirectory() as out:
        quiet(fxtap.extract, model, names, loader, out, device=DEV, dtype=dtype, shard_size=16, progress=False)
        features = fxtap.load_features(out, mmap=False)
        rows = {name: features.tensors[name] for name in names}
        files = features.files
    if files != list(range(64)):
        raise Fail(f"row ids {files[:10]}...")
    autocast = torch.autocast(DEV.type, dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        truth = {name: [] for name in names}
        for (batch,) in loader:
            values = hook_values(model, ["layer1.0.bn2", "layer1.0", "layer2", "layer4"], batch.to(DEV))
            stem = model.maxpool(model.relu(model.bn1(model.conv1(batch.to(DEV)))))
            values["layer1.0.add"] = values["layer1.0.bn2"] + stem
            for name in names:
                value = values[name]
                wide = value if value.dtype == torch.float32 else value.float()
                truth[name].append(wide.mean(dim=(2, 3)).to(value.dtype).cpu())
    for name in names:
        d(name, rows[name], torch.cat(truth[name]))
    return f"64 rows, 8 per batch, 4 shards, {dtype or 'float32'}; {d}"


@check("extract")
def extract() -> str:
    return extract_check(None, RTOL)


@check("extract_autocast")
def extract_autocast() -> str:
    if DEV.type == "cuda":
        return extract_check(torch.float16, 1e-3)
    return "float16 autocast needs CUDA, ran bfloat16: " + extract_check(torch.bfloat16, 1e-2)


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1)).eval().to(DEV)


@check("export_pt2")
def export_pt2() -> str:
    """fxtap.export to .pt2 on the device: a traced convnet (FX graph) and BertModel (its torch.export graph)."""
    model, d = small_convnet(), Diffs(rtol=1e-5, atol=1e-4)
    x, names = torch.randn(2, 3, 16, 16, device=DEV), {"1": "bn", "3": "conv"}
    bert = hf("bert")
    example = {"input_ids": tokens(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long, device=DEV)}
    longer = {"input_ids": tokens(3, 12, seed=4), "attention_mask": torch.ones(3, 12, dtype=torch.long, device=DEV)}
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        truth = hook_values(model, list(names), torch.cat([x, x]))
        out = torch.export.load(str(fxtap.export(model, names, x, Path(folder) / "taps.pt2"))).module()(torch.cat([x, x]))
        d("convnet", [out["bn"], out["conv"]], [truth["1"], truth["3"]])
        truth = hook_values(bert, ["encoder.layer.1.output.dense", "pooler"], **longer)
        path = quiet(fxtap.export, bert, {"encoder.layer.1.output.dense": "dense", "pooler": "pooled"}, example, Path(folder) / "bert.pt2")
        out = torch.export.load(str(path)).module()(**longer)
        d("bert", [out["dense"], out["pooled"]], [truth["encoder.layer.1.output.dense"], truth["pooler"]])
    return f"convnet and BertModel, loaded and run on {DEV}; {d}"


@check("export_onnx")
def export_onnx() -> str:
    """fxtap.export to .onnx of the convnet, checked with ONNX Runtime on the CPU (the model moved there)."""
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    model, d = small_convnet(), Diffs(rtol=1e-5, atol=1e-4)
    x, names = torch.randn(4, 3, 16, 16, device=DEV), {"1": "bn", "3": "conv"}
    with torch.no_grad():
        truth = hook_values(model, list(names), x)
    with tempfile.TemporaryDirectory() as folder:
        path = fxtap.export(model.cpu(), names, x[:2].cpu(), Path(folder) / "taps.onnx")  # ONNX Runtime runs on the CPU here
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.cpu().numpy()}
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    d("onnx", [torch.from_numpy(got["bn"]), torch.from_numpy(got["conv"])], [truth["1"].cpu(), truth["3"].cpu()])
    return f"written from the model on the CPU, vs eager on {DEV}; {d}"


@check("compile_fx")
def compile_fx() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(inplace=True), nn.Linear(64, 16)).eval().to(DEV)
    x, d = torch.randn(8, 32, device=DEV), Diffs(rtol=1e-4, atol=1e-5)  # inductor fuses: other rounding
    compiled = torch.compile(fxtap.tap(model, ["0", "1", "2"]))
    with torch.no_grad():
        truth = hook_values(model, ["0", "1", "2"], x)
        for call in (1, 2):
            out = compiled(x)
            for name in ["0", "1", "2"]:
                d(f"call {call} {name}", out[name], truth[name])
    return f"inductor; {d}"


def timed(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fxtap's FallbackWarning for GPT2 (the export path)
        for fn in fns.values():
            for _ in range(5):  # a fresh CPU process runs its first calls of resnet18 many times slower
                fn()
        for _ in range(runs):
            for key, fn in fns.items():  # interleaved
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@check("timing")
def timing() -> str:
    big = DEV.type == "cuda"
    batch, size, runs = (32, 224, 30) if big else (1, 64, 3)
    model = resnet18()
    x = torch.randn(batch, 3, size, size, device=DEV)
    tapped = fxtap.tap(model, ["layer1", "layer2", "layer3", "layer4"])
    r = timed({"plain": lambda: model(x), "tapped": lambda: tapped(x)}, runs)
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000, n_positions=512, bos_token_id=0, eos_token_id=0)).eval().to(DEV)
    ids = torch.randint(0, 1000, (8, 128 if big else 32), device=DEV)
    tapped_gpt2 = quiet(fxtap.tap, gpt2, [f"h.{i}" for i in range(4)])
    g = timed({"plain": lambda: gpt2(ids), "tapped": lambda: tapped_gpt2(ids)}, runs)
    return (f"resnet18 b{batch} {size}px 4 stages ({tapped.mode}): {r['plain']:.2f} vs {r['tapped']:.2f} ms, ratio "
            f"{r['tapped'] / r['plain']:.3f}; gpt2 4x256 8x{ids.shape[1]} ({tapped_gpt2.mode}): {g['plain']:.2f} vs "
            f"{g['tapped']:.2f} ms, ratio {g['tapped'] / g['plain']:.3f}; median of {runs} (not pass/fail)")


# -- running ---------------------------------------------------------------------------------------
def where(error: BaseException) -> str:
    """The last traceback frame inside fxtap (or the last one at all)."""
    frames = traceback.extract_tb(error.__traceback__)
    package = str(ROOT / "fxtap")
    inside = [f for f in frames if f.filename.startswith(package)]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return ""
    return f" at {os.path.relpath(frame.filename, ROOT)}:{frame.lineno} in {frame.name}"


def run_one(name: str, fn: Callable[[], str], cuda_only: bool) -> dict[str, Any]:
    start = time.perf_counter()
    faulthandler.dump_traceback_later(120, exit=False)  # a check that hangs shows where
    if IMPORT_ERROR is not None:
        status, detail = "FAIL", f"import fxtap: {type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}{where(IMPORT_ERROR)}"
    elif cuda_only and DEV.type != "cuda":
        status, detail = "SKIP", "needs CUDA"
    else:
        try:
            status, detail = "OK", fn()
        except Skip as error:
            status, detail = "SKIP", str(error)
        except Fail as error:
            status, detail = "FAIL", str(error)
        except Exception as error:  # noqa: BLE001 - every check reports, none stops the others
            message = " ".join(str(error).split())[:400]
            status, detail = "FAIL", f"{type(error).__name__}: {message}{where(error)}"
        try:
            sync()
        except Exception as error:  # noqa: BLE001 - a CUDA error surfaces here
            status, detail = "FAIL", f"{detail}; synchronize raised {type(error).__name__}: {error}"
    faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - start
    print(f"{status} {name} [{seconds:.1f}s] {detail}", flush=True)
    return {"name": name, "status": status, "detail": detail, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a dry run)")
    parser.add_argument("--out", required=True, help="the JSON summary is written here")
    parser.add_argument("--only", action="append", choices=[name for name, _, _ in CHECKS], help="run only this check (repeatable)")
    args = parser.parse_args(argv)
    try:
        DEV = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if DEV.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, not {args.device!r}")
    if DEV.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else platform.processor() or platform.machine()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("torchvision", "transformers", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    print(f"device {DEV} ({name}); {versions}; fxtap from {ROOT}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for check_name, fn, cuda_only in CHECKS:
        if not args.only or check_name in args.only:
            results.append(run_one(check_name, fn, cuda_only))
            counts = {s: sum(r["status"] == s for r in results) for s in ("OK", "FAIL", "SKIP")}
            summary = {"device": str(DEV), "device_name": name, **versions, "counts": counts,
                       "seconds": round(time.perf_counter() - start, 3), "checks": results}  # fmt: skip
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")  # after every check: a killed run keeps what it did
    counts = {s: sum(r["status"] == s for r in results) for s in ("OK", "FAIL", "SKIP")}
    print(f"total {time.perf_counter() - start:.1f}s: {counts['OK']} OK, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
