"""fxtap.export and fxtap.backbone: each written file is loaded back and compared with eager here,
independently of the check inside ``export``.

The matrix runs every model in MODELS through every format; the heavier models are marked slow.
Each case records its max abs diff and seconds as junit properties (``--junitxml``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import onnxruntime
import pytest
import timm
import torch
import torchvision
from torch import nn

import fxtap
from support.toy_models import DataDependent, MultiIO

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[2]
ATOL, RTOL = 1e-4, 1e-5  # per output: |file - eager| <= ATOL + RTOL * max|eager|, as fxtap.export checks


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    names: dict[str, str]
    size: int
    slow: bool


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, **kwargs)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


STAGES = {"features.1": "c2", "features.3": "c3", "features.5": "c4", "features.7": "c5"}
MODELS = {
    "resnet50": Case(_torchvision("resnet50"), {"layer1.0.add": "res", "layer2": "c3", "layer3": "c4", "layer4": "c5"}, 64, True),
    "mobilenet_v3_large": Case(
        _torchvision("mobilenet_v3_large"), {"features.3": "c2", "features.6": "c3", "features.12": "c4", "features.16": "c5"}, 64, True
    ),
    "efficientnet_b0": Case(
        _torchvision("efficientnet_b0"), {"features.2": "c2", "features.3": "c3", "features.5": "c4", "features.7": "c5"}, 64, True
    ),
    "convnext_tiny": Case(_torchvision("convnext_tiny"), STAGES, 64, True),
    "vit_b_16": Case(_torchvision("vit_b_16", image_size=64), {"encoder.layers.encoder_layer_5": "mid", "encoder.ln": "last"}, 64, True),
    "swin_t": Case(_torchvision("swin_t"), STAGES, 64, True),
    "timm_resnet18": Case(_timm("resnet18"), {"act1": "c1", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}, 64, False),
    "timm_vit_tiny_patch16_224": Case(_timm("vit_tiny_patch16_224", img_size=64), {"blocks.5": "mid", "norm": "last"}, 64, True),
}
FORMATS = {"onnx": "onnx", "pt2": "pt2", "torchscript": "pt"}


@cache
def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[arch].build().eval()


def _input(arch: str, batch: int) -> torch.Tensor:
    size = MODELS[arch].size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _load(fmt: str, path: Path) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """A runner for the written file, built from each runtime's own API (not from fxtap)."""
    if fmt == "pt2":
        module = torch.export.load(path).module()
        return lambda x: dict(module(x))
    if fmt == "torchscript":
        scripted = torch.jit.load(str(path))
        return lambda x: dict(scripted(x))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(outputs, map(torch.from_numpy, session.run(None, {session.get_inputs()[0].name: x.numpy()}))))


def max_abs_diff(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """The largest |actual - expected| over all keys; fails unless keys, shapes and values agree
    (per output: |actual - expected| <= ATOL + RTOL * max|expected|)."""
    assert list(actual) == list(expected)
    for key, want in expected.items():
        assert actual[key].shape == want.shape, key
        bound = ATOL + RTOL * want.abs().max().item()
        torch.testing.assert_close(actual[key], want, atol=bound, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    return max((actual[k].double() - v.double()).abs().max().item() for k, v in expected.items())


def test_max_abs_diff_fails_on_a_perturbed_value() -> None:
    a = {"c3": torch.zeros(2, 3)}
    assert max_abs_diff(a, {"c3": torch.full((2, 3), 5e-5)}) == pytest.approx(5e-5)
    with pytest.raises(AssertionError):
        max_abs_diff(a, {"c3": torch.full((2, 3), 1e-3)})
    with pytest.raises(AssertionError):
        max_abs_diff(a, {"c3": torch.zeros(2, 3), "c4": torch.zeros(1)})
    large = {"c5": torch.tensor([100.0, 1.0])}  # the relative part follows the output's largest value
    max_abs_diff(large, {"c5": torch.tensor([100.0, 1.0 + 1e-3])})
    with pytest.raises(AssertionError):
        max_abs_diff(large, {"c5": torch.tensor([100.0, 1.0 + 2e-3])})


def _float64_error(arch: str, x: torch.Tensor, values: dict[str, torch.Tensor]) -> float:
    """The largest |value - v64| over the keys, v64 computed by a float64 copy of the model."""
    names = MODELS[arch].names
    with torch.no_grad():
        exact = fxtap.tap(copy.deepcopy(_model(arch)).double(), names)(x.double())
    return max((values[k].double() - v).abs().max().item() for k, v in exact.items())


# -- the matrix ----------------------------------------------------------------------------------
def _slow_if(arch: str, fmt: str = "") -> list[pytest.MarkDecorator]:
    # the default run keeps timm_resnet18 to pt2 and TorchScript (ONNX files are checked by the cut and docs tests)
    return [pytest.mark.slow] if MODELS[arch].slow or fmt == "onnx" else []


@pytest.mark.parametrize(("arch", "fmt"), [pytest.param(arch, fmt, marks=_slow_if(arch, fmt)) for arch in MODELS for fmt in FORMATS])
def test_export_matrix_file_matches_eager(arch: str, fmt: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model, names = _model(arch), MODELS[arch].names
    tapped = fxtap.tap(model, names)
    assert tapped.mode == "fx"
    start = time.perf_counter()
    path = fxtap.export(model, names, _input(arch, 1), tmp_path / f"taps.{FORMATS[fmt]}", format=fmt)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    run = _load(fmt, path)
    diffs = []
    for batch in (1, 3):  # the file was traced at batch 2: both are other sizes
        x = _input(arch, batch)
        with torch.no_grad():
            expected, actual = tapped(x), run(x)
        assert list(actual) == list(names.values())  # ONNX outputs are named by the keys
        diffs.append(max_abs_diff(expected, actual))
        if fmt == "onnx":  # another runtime's kernels: as close to float64 as eager float32 is
            eager_error, file_error = _float64_error(arch, x, expected), _float64_error(arch, x, actual)
            assert file_error <= 2 * eager_error + 1e-6, (file_error, eager_error)
            request.node.user_properties.append((f"float64_error_batch{batch}", (file_error, eager_error)))
    request.node.user_properties.append(("max_abs_diff", max(diffs)))
    request.node.user_properties.append(("seconds", round(seconds, 1)))


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=_slow_if(arch)) for arch in MODELS])
def test_export_matrix_compiles_without_graph_breaks(arch: str, request: pytest.FixtureRequest) -> None:
    tapped = fxtap.tap(_model(arch), MODELS[arch].names)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(tapped, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x = _input(arch, 2)
    with torch.no_grad():
        diff = max_abs_diff(tapped(x), compiled(x))
    request.node.user_properties.append(("max_abs_diff", diff))
    request.node.user_properties.append(("seconds", round(time.perf_counter() - start, 1)))


@pytest.mark.slow
def test_export_compile_inductor_resnet18_matches_eager() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    tapped = fxtap.tap(model, {"layer1.0.add": "res", "layer2": "c3", "layer4": "c5"})
    torch._dynamo.reset()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        max_abs_diff(tapped(x), torch.compile(tapped, fullgraph=True)(x))


# -- pruning: nothing after the last tap is written ------------------------------------------------
def _weights(fmt: str, path: Path) -> set[str]:
    if fmt == "pt2":
        return set(torch.export.load(path).state_dict)
    if fmt == "torchscript":
        return {name for name, _ in torch.jit.load(str(path)).named_parameters()}
    return {init.name for init in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_writes_only_the_pruned_graph(fmt: str, tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    path = fxtap.export(model, {"layer2.0.conv1": "c"}, torch.randn(1, 3, 32, 32), tmp_path / f"m.{FORMATS[fmt]}")
    weights = _weights(fmt, path)
    assert any(name.startswith("layer2.0.conv1") for name in weights), weights
    later = ("layer2.0.bn1", "layer2.0.conv2", "layer2.0.downsample", "layer2.1", "layer3", "layer4", "fc")
    assert [name for name in weights if name.startswith(later)] == []


def test_export_torchscript_keeps_values_that_inplace_ops_overwrite(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    names = ["bn1", "layer1.0.add"]  # both are followed by ReLU(inplace=True): fxtap copies them
    path = fxtap.export(model, names, torch.randn(1, 3, 32, 32), tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    out = dict(torch.jit.load(str(path))(x))
    assert all((out[name] < 0).any() for name in names)
    max_abs_diff(fxtap.tap(model, names)(x), out)


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_hooked_name_error_names_the_untraceable_submodule(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(fxtap.FxtapError, match=r"cannot export 'gate\.a' of DataDependent: forward hooks capture it") as info:
        fxtap.export(DataDependent().eval(), ["pre", "gate.a"], torch.randn(2, 4), tmp_path / "m", format=fmt)  # type: ignore[arg-type]
    assert "'gate.a' is inside submodule 'gate' (Gate), which torch.fx cannot trace: TraceError" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_name_inside_torch_nn_module_names_it(tmp_path: Path) -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(x)

    with pytest.raises(fxtap.FxtapError, match=r"'enc\.linear1' is inside submodule 'enc' \(TransformerEncoderLayer\)"):
        fxtap.export(Encoder().eval(), ["enc.linear1"], torch.randn(2, 3, 8), tmp_path / "m.pt2")


class UntraceableRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head(y) if y.sum() > 0 else y


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (
            ["body", "body.0"],
            r"^cannot export the taps of UntraceableRoot: torch\.fx cannot trace the forward of UntraceableRoot itself: TraceError",
        ),
        (
            ["body", "head"],
            r"^cannot export 'head' of UntraceableRoot(.|\n)*'head': torch\.fx cannot trace the forward of UntraceableRoot itself",
        ),
    ],
)
def test_export_untraceable_root_error_names_the_root(names: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(fxtap.FxtapError, match=match):
        fxtap.export(UntraceableRoot().eval(), names, torch.randn(2, 4), tmp_path / "m.pt2")


def test_export_opaque_submodule_that_torch_export_cannot_trace_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(fxtap.FxtapError, match=r"^pt2 export of the taps of DataDependent failed: GuardOnDataDependentSymNode"):
        fxtap.export(DataDependent().eval(), ["pre", "gate"], torch.randn(2, 4), tmp_path / "m.pt2")


@pytest.mark.filterwarnings("ignore::fxtap.FallbackWarning")
def test_export_opaque_submodule_scripts_when_torchscript_can(tmp_path: Path) -> None:
    model = DataDependent().eval()
    path = fxtap.export(model, ["pre", "gate"], torch.randn(2, 4), tmp_path / "m.pt")
    x = torch.randn(5, 4)
    max_abs_diff(fxtap.tap(model, ["pre", "gate"])(x), dict(torch.jit.load(str(path))(x)))


def test_export_train_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"export needs ResNet in eval mode.*call model.eval\(\)"):
        fxtap.export(torchvision.models.resnet18(), ["layer1"], torch.randn(1, 3, 32, 32), tmp_path / "m.pt2")


@pytest.mark.parametrize(
    ("path", "fmt", "match"),
    [("m.bin", None, r"cannot tell the export format from 'm\.bin'"), ("m.pt2", "tflite", "format must be one of")],
)
def test_export_format_errors(path: str, fmt: str | None, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        fxtap.export(DataDependent().eval(), ["pre"], torch.randn(2, 4), tmp_path / path, format=fmt)  # type: ignore[arg-type]


def test_export_verification_catches_a_wrong_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fxtap._deploy import export as _export

    real = _export._write_pt2

    def perturbed(graph: Any, args: Any, path: Path, dynamic_batch: bool, outputs: Any) -> None:
        with torch.no_grad():
            graph.pre.bias += 1.0  # the written file computes something else than the model
        try:
            real(graph, args, path, dynamic_batch, outputs)
        finally:
            with torch.no_grad():
                graph.pre.bias -= 1.0

    monkeypatch.setattr(_export, "_write_pt2", perturbed)
    with pytest.raises(
        fxtap.FxtapError, match=r"the pt2 file 'm\.pt2' differs from eager on inputs of shape \(2, 4\).*'pre': max abs diff 1"
    ):
        fxtap.export(DataDependent().eval(), ["pre"], torch.randn(2, 4), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()  # a file that failed the check is removed


def test_export_failure_keeps_an_untouched_older_file(tmp_path: Path) -> None:
    older = tmp_path / "m.pt2"
    older.write_bytes(b"an earlier export")
    with pytest.raises(fxtap.FxtapError, match="pt2 export of the taps of DataDependent failed"):
        fxtap.export(DataDependent().eval(), ["pre", "gate"], torch.randn(2, 4), older)  # fails before writing
    assert older.read_bytes() == b"an earlier export"


# -- several inputs, tuple taps, non-tensor defaults ------------------------------------------------
def test_export_onnx_names_tuple_parts_by_key_and_index(tmp_path: Path) -> None:
    model = MultiIO().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    path = fxtap.export(model, {"fc": "fc", "split": "parts"}, (x, y), tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["fc", "parts.0", "parts.1"]
    assert [i.name for i in session.get_inputs()] == ["x", "y"]


def test_export_torchscript_drops_default_arguments_and_refuses_tuple_taps(tmp_path: Path) -> None:
    model = MultiIO().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    path = fxtap.export(model, ["fc", "split.mul"], (x, y), tmp_path / "m.pt")
    max_abs_diff(fxtap.tap(model, ["fc", "split.mul"])(x, y), dict(torch.jit.load(str(path))(x, y)))
    with pytest.raises(fxtap.FxtapError, match=r"every tap must be one tensor: 'split' is a tuple"):
        fxtap.export(model, ["split"], (x, y), tmp_path / "n.pt")


def test_export_fixed_batch(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    path = fxtap.export(model, ["layer1"], torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", dynamic_batch=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]


# -- backbone and feature_info ---------------------------------------------------------------------
def test_backbone_feature_info_matches_timm_features_only() -> None:
    torch.manual_seed(0)
    names = ["act1", "layer1", "layer2", "layer3", "layer4"]
    features = fxtap.backbone(timm.create_model("resnet18", pretrained=False), names, torch.randn(1, 3, 64, 64))
    reference = timm.create_model("resnet18", pretrained=False, features_only=True).feature_info
    assert [f.channels for f in features.feature_info] == reference.channels()
    assert [f.reduction for f in features.feature_info] == reference.reduction()
    assert [f.name for f in features.feature_info] == names == [f.key for f in features.feature_info]
    assert features.feature_info[2] == fxtap.FeatureInfo("layer2", "layer2", 128, 8, (1, 128, 8, 8))


def test_backbone_feature_info_channels_last_and_tokens() -> None:
    swin = fxtap.backbone(torchvision.models.swin_t(weights=None), STAGES, torch.randn(1, 3, 64, 64))
    assert [(f.key, f.channels, f.reduction, f.shape) for f in swin.feature_info] == [
        ("c2", 96, 4, (1, 16, 16, 96)),
        ("c3", 192, 8, (1, 8, 8, 192)),
        ("c4", 384, 16, (1, 4, 4, 384)),
        ("c5", 768, 32, (1, 2, 2, 768)),
    ]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    tokens = fxtap.backbone(vit, ["blocks.5"], torch.randn(1, 3, 64, 64)).feature_info[0]
    assert (tokens.channels, tokens.reduction, tokens.shape) == (
        vit.feature_info[5]["num_chs"],
        vit.feature_info[5]["reduction"],
        (1, 17, 192),
    )


@pytest.mark.parametrize(
    ("shape", "spatial", "expected"),
    [
        ((1, 64, 16, 16), (64, 64), (64, 4)),  # (N, C, H, W)
        ((1, 16, 16, 96), (64, 64), (96, 4)),  # (N, H, W, C): W = 96 does not divide 64
        ((1, 8, 8, 8), (64, 64), (8, 8)),  # ambiguous: read as (N, C, H, W)
        ((1, 64, 8, 16), (64, 128), (64, 8)),
        ((1, 64, 8, 8), (64, 128), (64, None)),  # no single factor
        ((1, 64, 33, 33), (65, 65), (64, None)),  # does not divide
        ((1, 197, 768), (224, 224), (768, 16)),  # tokens: 14 x 14 patches + a class token
        ((1, 196, 384), (224, 224), (384, 16)),
        ((1, 512), (64, 64), (512, None)),
    ],
)
def test_backbone_layout_reads_channels_and_reduction(shape: tuple[int, ...], spatial: tuple[int, ...], expected: tuple[int, Any]) -> None:
    from fxtap._deploy.backbone import _layout

    assert _layout(shape, spatial) == expected


def test_backbone_keeps_train_mode_and_runs_without_grad() -> None:
    model = torchvision.models.resnet18(weights=None)  # train mode: the example must not update BatchNorm statistics
    before = model.bn1.running_mean.clone()
    features = fxtap.backbone(model, ["layer1", "avgpool", "flatten"], torch.randn(2, 3, 32, 32))
    assert model.training and torch.equal(model.bn1.running_mean, before)
    assert [(f.channels, f.reduction) for f in features.feature_info] == [(64, 4), (512, 32), (512, None)]


def test_backbone_feeds_torchvision_fpn() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    body = fxtap.backbone(model, {"layer2": "c3", "layer3": "c4", "layer4": "c5"}, torch.randn(1, 3, 64, 64))
    fpn = torchvision.ops.FeaturePyramidNetwork([f.channels for f in body.feature_info], out_channels=32).eval()
    out = fpn(body(torch.randn(2, 3, 96, 96)))
    assert {key: tuple(v.shape) for key, v in out.items()} == {"c3": (2, 32, 12, 12), "c4": (2, 32, 6, 6), "c5": (2, 32, 3, 3)}


@pytest.mark.slow  # 14 s: a subprocess exporting to pt2 and ONNX; the backbone tests above cover its parts
def test_backbone_example_runs() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fpn_backbone.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "p5 (2, 64, 2, 2) 32" in proc.stdout.splitlines(), proc.stdout
    assert "torch.export matches eager: True" in proc.stdout.splitlines(), proc.stdout
    assert "onnx outputs: ['p2', 'p3', 'p4', 'p5']" in proc.stdout.splitlines(), proc.stdout


@torch.fx.wrap
def _bounded(x: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[0] <= 1000)  # as cuDNN's convolutions guard the batch on CUDA (at most 65535)
    return x


class _BoundedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_bounded(x)).relu()


def test_export_pt2_keeps_a_batch_the_code_bounds_dynamic(tmp_path: Path) -> None:
    # torch.export refuses an unbounded batch when the code guards its size; fxtap takes the
    # bounds torch.export suggests (found on an H200: a CUDA convolution, torch 2.11)
    torch.manual_seed(0)
    model = _BoundedBatch().eval()
    fxtap.export(model, ["fc"], torch.randn(2, 3), tmp_path / "m.pt2")
    program = torch.export.load(tmp_path / "m.pt2")
    for batch in (2, 7):
        x = torch.randn(batch, 3)
        torch.testing.assert_close(program.module()(x)["fc"], model.fc(x), rtol=0, atol=0)
    assert [r.upper for r in program.range_constraints.values()] == [1000]
