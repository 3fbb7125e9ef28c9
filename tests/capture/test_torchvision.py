"""The FX path on real torchvision models (random weights): values equal clones taken in hooks."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

import fxtap
from support.truth import assert_same, assert_unchanged, hook_truth, model_fingerprint

# model -> (input size, module names spread through the graph)
CASES = {
    "resnet18": (64, ["conv1", "bn1", "layer1.0.relu_1", "layer2", "layer3.1", "layer4.1.relu_1", "fc"]),
    "resnet50": (64, ["bn1", "layer1.0.bn3", "layer2", "layer3.5.relu_2", "layer4"]),
    "mobilenet_v3_small": (64, ["features.0.0", "features.0.1", "features.1.block.1.fc1", "features.4.block.0", "features.12", "classifier.0"]),
    "convnext_tiny": (64, ["features.0.0", "features.1.0.block.0", "features.1.0.block.4", "features.3", "features.7.2"]),
    "swin_t": (64, ["features.0.0", "features.1.0.norm1", "features.1.0.mlp.0", "features.3", "norm"]),
    "vit_b_16": (224, ["conv_proj", "encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_1.mlp", "encoder.ln"]),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


SLOW = {"vit_b_16"}  # 224 x 224 for its fixed position embedding: resnet18 and swin_t cover the default run


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.slow] if a in SLOW else []) for a in CASES])
def test_module_taps_equal_hook_clones(arch: str) -> None:
    size, names = CASES[arch]
    model = _model(arch)
    x = torch.randn(1, 3, size, size)
    truth = hook_truth(model, x)
    before = model_fingerprint(model)
    tapped = fxtap.tap(model, names, mode="fx")
    assert tapped.mode == "fx"
    out = tapped(x)
    assert list(out) == names
    for name in names:
        assert_same(out[name], truth[name])
    assert_unchanged(before, model)


def test_resnet18_bn1_is_taken_before_the_inplace_relu() -> None:
    model = _model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    out = fxtap.tap(model, ["bn1", "relu"])(x)
    assert out["bn1"].min() < 0  # the naive hook recipe returns post-ReLU values here
    assert_same(out["relu"], out["bn1"].clamp(min=0).detach())


def test_resnet18_functional_add_equals_recomputation() -> None:
    model = _model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    truth = hook_truth(model, x)
    out = fxtap.tap(model, ["layer1.0.add", "layer2.0.add", "flatten"])(x)
    assert_same(out["layer1.0.add"], truth["layer1.0.bn2"] + truth["maxpool"])
    assert_same(out["layer2.0.add"], truth["layer2.0.bn2"] + truth["layer2.0.downsample"])
    assert_same(out["flatten"], torch.flatten(truth["avgpool"], 1))


def test_resnet18_names_follow_torchvision_convention() -> None:
    names = fxtap.names(_model("resnet18"))
    for name in ["x", "conv1", "layer1.0.relu", "layer1.0.relu_1", "layer1.0.add", "layer1", "avgpool", "flatten", "fc"]:
        assert name in names
    assert names.index("layer1.0.relu") < names.index("layer1.0.add") < names.index("layer1.0.relu_1")


def test_vit_ln_1_is_the_module_not_a_call_suffix() -> None:
    model = _model("vit_b_16")
    x = torch.randn(1, 3, 224, 224)
    truth = hook_truth(model, x)
    block = "encoder.layers.encoder_layer_0"
    out = fxtap.tap(model, [f"{block}.ln_1", f"{block}.ln_2", f"{block}.add", f"{block}.add_1"])(x)
    assert_same(out[f"{block}.ln_1"], truth[f"{block}.ln_1"])
    assert_same(out[f"{block}.ln_2"], truth[f"{block}.ln_2"])
    assert not torch.equal(out[f"{block}.ln_1"], out[f"{block}.ln_2"])
    assert_same(out[f"{block}.add_1"], truth[f"{block}.mlp"] + out[f"{block}.add"].detach())


def test_vit_early_tap_prunes_later_encoder_layers() -> None:
    model = _model("vit_b_16")
    tapped = fxtap.tap(model, ["encoder.layers.encoder_layer_2"])
    graph = [r.graph for r in tapped._runners.values()][0]
    layers = {str(n.target).split(".")[2] for n in graph.graph.nodes if n.op == "call_module" and str(n.target).startswith("encoder.layers.")}
    assert layers == {"encoder_layer_0", "encoder_layer_1", "encoder_layer_2"}
    x = torch.randn(1, 3, 224, 224)
    truth = hook_truth(model, x)
    assert_same(tapped(x)["encoder.layers.encoder_layer_2"], truth["encoder.layers.encoder_layer_2"])


def test_mobilenet_ops_blocks_are_tappable() -> None:
    model = _model("mobilenet_v3_small")
    names = set(fxtap.names(model))
    modules = [path for path, _ in model.named_modules() if path]
    reachable = [path for path in modules if path in names]
    assert len(reachable) == len(modules), sorted(set(modules) - names)[:10]


@pytest.mark.slow  # a timing: never in the default run (benchmarks/ measures speed)
def test_vit_early_tap_is_faster_than_full_forward() -> None:
    """Reported in the closing note; asserts only the direction, with a wide margin."""
    model = _model("vit_b_16")
    x = torch.randn(1, 3, 224, 224)
    tapped = fxtap.tap(model, ["encoder.layers.encoder_layer_2"])

    def best(fn: object, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        tapped(x), model(x)
        early, full = best(lambda: tapped(x)), best(lambda: model(x))
    print(f"vit_b_16 early tap {early * 1000:.1f} ms vs full forward {full * 1000:.1f} ms ({early / full:.2f}x)")
    assert early < 0.6 * full


@pytest.mark.slow
def test_mvit_every_module_equals_hook_clone() -> None:
    """torchvision's DCE drops mvit's ``x.add_(pos)``; fxtap keeps it (about 30 s on 2 cores)."""
    model = getattr(torchvision.models.video, "mvit_v1_b")(weights=None).eval()
    x = torch.randn(1, 3, 16, 224, 224)
    truth = hook_truth(model, x)
    modules = dict(model.named_modules())
    names = [n for n in fxtap.names(model) if n in modules]
    assert len(names) > 300
    out = fxtap.tap(model, names, mode="fx", keep_output=True)(x)
    for name in [*names, "output"]:
        assert_same(out[name], truth[name])
