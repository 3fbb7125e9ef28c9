"""fxtap.cut: the part of a model between named values equals the model, and says what it misses.

Every comparison is with the full model run eagerly (or ``fxtap.tap`` of it, which the capture
tests check against eager), exactly: the cut runs the same kernels on the same values.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from support import cut_models, cuts
from support.truth import assert_unchanged, model_fingerprint
from torch import nn

import fxtap


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def _missing(model: nn.Module, inputs: list[str], outputs: list[str] | None = None, **options: object) -> list[str]:
    with pytest.raises(fxtap.CutError) as caught:
        fxtap.cut(model, inputs, outputs or ["output"], **options)  # type: ignore[arg-type]
    for name in caught.value.missing:
        assert repr(name) in str(caught.value)
    return caught.value.missing


# -- equal to the model ------------------------------------------------------------------------------------
def test_cut_head_equals_model_and_leaves_it_unchanged() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 64, 64)
    before = model_fingerprint(model)
    head = fxtap.cut(model, ["layer3"])
    assert head.inputs == ["layer3"] and head.outputs == ["output"]
    features = fxtap.tap(model, ["layer3"])(x)["layer3"]
    kept = features.clone()
    with torch.no_grad():
        assert torch.equal(head(features)["output"], model(x))
        assert torch.equal(head(layer3=features)["output"], model(x))
    assert torch.equal(features, kept)
    assert_unchanged(before, model)
    assert head.model is model and {id(p) for p in head.parameters()} == {id(p) for p in model.parameters()}
    modules = {n.target for n in head.graph_module().graph.nodes if n.op == "call_module"}
    assert not any(str(m).startswith(("layer1", "layer2", "layer3", "conv1")) for m in modules)  # the prefix never runs


@pytest.mark.parametrize(
    ("point", "count"), [("layer1.0.bn2", 2), ("layer2.0.relu", 2), ("layer3.1.conv2", 2), ("layer4.0.downsample.0", 2), ("layer2.1.add", 1)]
)
def test_cut_inside_a_block_with_what_it_reports_equals_model(point: str, count: int) -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    inputs = cuts.check(model, (x,), {}, point, ["output", "layer4.0.add"])
    assert len(inputs) == count  # the value, and the block's shortcut unless the shortcut is already added


def test_cut_several_outputs_renamed_inputs_and_keywords() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    cut = fxtap.cut(model, {"layer2.1.bn2": "mid", "layer2.0": "skip"}, {"layer3": "c4", "output": "logits"})
    assert cut.inputs == ["mid", "skip"] and cut.outputs == ["c4", "logits"]
    taps = fxtap.tap(model, ["layer2.1.bn2", "layer2.0", "layer3"], keep_output=True)(x)
    with torch.no_grad():
        out = cut(skip=taps["layer2.0"], mid=taps["layer2.1.bn2"])
        positional = cut(taps["layer2.1.bn2"], taps["layer2.0"])
    assert list(out) == ["c4", "logits"]
    assert torch.equal(out["c4"], taps["layer3"]) and torch.equal(out["logits"], taps["output"])
    assert torch.equal(positional["logits"], out["logits"])
    with pytest.raises(TypeError, match="missing the input 'skip'"):
        cut(taps["layer2.1.bn2"])
    with pytest.raises(TypeError, match="no input 'other'"):
        cut(taps["layer2.1.bn2"], other=x)


def test_cut_never_writes_into_the_tensor_it_is_given() -> None:
    model = cut_models.WritesInput().eval()
    x = torch.randn(4, 8)
    h = model.a(x).detach()
    given = h.clone()
    cut = fxtap.cut(model, ["a"])
    expected = copy.deepcopy(model)(x)
    assert torch.equal(cut(given)["output"], expected)
    assert torch.equal(given, h)  # the graph's h.mul_(2) and h += 1 ran on a copy


def test_cut_guards_reading_only_values_before_the_cut_are_dropped() -> None:
    model = cut_models.WritesInput().eval()
    code = fxtap.cut(model, ["a"]).graph_module().code
    assert code.count("torch._assert(") == 1 and "8 features" in code and "x must be 2-d" not in code


def test_cut_takes_a_model_input_read_after_the_cut_as_an_extra_argument() -> None:
    torch.manual_seed(0)
    model = cut_models.GlobalSkip().eval()
    x, scale = torch.randn(3, 8), torch.randn(3, 8)
    cut = fxtap.cut(model, ["a"])
    assert cut.inputs == ["a", "x", "scale"]
    with torch.no_grad():
        assert torch.equal(cut(model.a(x), x, scale)["output"], model(x, scale))
        assert torch.equal(cut(model.a(x), scale=scale, x=x)["output"], model(x, scale))
    with pytest.raises(fxtap.CutError, match="key 'x' also names a model input"):
        fxtap.cut(model, {"a": "x"})


def test_cut_takes_a_shape_read_before_the_cut_from_the_cut_inputs_with_an_example() -> None:
    torch.manual_seed(0)
    model = cut_models.BatchRead().eval()
    x = torch.randn(5, 8)
    assert fxtap.cut(model, ["b"]).inputs == ["b", "x"]  # without an example: the input itself, for its shape
    cut = fxtap.cut(model, ["b"], example=x)
    assert cut.inputs == ["b"]
    with torch.no_grad():
        assert torch.equal(cut(model.b(torch.tanh(model.a(x))))["output"], model(x))
        y = torch.randn(7, 8)  # another batch size: the size comes from the cut input
        assert torch.equal(cut(model.b(torch.tanh(model.a(y))))["output"], model(y))


def test_cut_shape_read_of_an_upstream_value_is_reported_as_missing() -> None:
    model = torchvision.models.swin_t(weights=None).eval()
    missing = _missing(model, ["features.1.0.mlp.1"])
    assert missing == ["features.1.0.add"]  # the residual, read for its value


def test_cut_train_mode_draws_and_updates_state_like_the_model() -> None:
    torch.manual_seed(0)
    model = cut_models.TrainHead().train()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 8)
    cut = fxtap.cut(twin, ["a"])
    torch.manual_seed(1)
    expected = model(x)
    h = twin.a(x)
    torch.manual_seed(1)
    got = cut(h)["output"]
    assert torch.equal(got, expected)
    assert torch.equal(twin.bn.running_mean, model.bn.running_mean) and int(twin.bn.num_batches_tracked) == 1
    twin.eval()
    assert torch.equal(cut(h)["output"], twin.b(twin.bn(h)))  # the eval graph, built at call time


# -- what a cut misses -------------------------------------------------------------------------------------------
def test_cut_names_every_skip_of_a_unet() -> None:
    model = cut_models.UNet().eval()
    assert _missing(model, ["mid"]) == ["enc1", "enc2"]
    assert _missing(model, ["dec2"]) == ["enc1"]
    assert _missing(model, ["mid", "enc2"]) == ["enc1"]
    x = torch.randn(2, 3, 16, 16)
    assert cuts.check(model, (x,), {}, "mid", ["output", "dec2"]) == ["mid", "enc1", "enc2"]


def test_cut_names_the_shortcut_of_a_resnet_block() -> None:
    model = _resnet18()
    assert _missing(model, ["layer2.0.bn2"]) == ["layer1"]
    assert _missing(model, ["layer2.1.conv1"]) == ["layer2.0"]
    assert _missing(model, ["layer3"], ["output", "layer2.1.add"]) == ["layer2.1.add"]  # an output before the cut


def test_cut_names_the_dense_concatenations_of_densenet() -> None:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None).eval()
    block = "features.denseblock4"
    missing = _missing(model, [f"{block}.denselayer4.conv1"])
    assert missing == ["features.transition3", *[f"{block}.denselayer{i}" for i in (1, 2, 3)]]
    fxtap.cut(model, ["features.transition3"])  # a clean cut: everything after reads only it


@pytest.mark.parametrize("name", ["fcn_resnet50", pytest.param("deeplabv3_resnet50", marks=pytest.mark.slow)])
def test_cut_names_what_a_segmentation_head_misses(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False).eval()
    assert _missing(model, ["backbone.layer4.1.conv1"]) == ["backbone.layer4.0"]
    cut = fxtap.cut(model, ["backbone.layer4.1.conv1", "backbone.layer4.0"])
    assert cut.inputs[-1] == "x"  # the output is resized to the input's size: the input comes too
    x = torch.randn(1, 3, 32, 32)
    assert cuts.check(model, (x,), {}, "classifier.0", ["output"]) is not None


# -- what a cut refuses ---------------------------------------------------------------------------------------
def test_cut_through_untraceable_code_names_the_module() -> None:
    model = cut_models.HasGate().eval()
    with pytest.raises(fxtap.TraceFailedError, match="'gate' \\(Gate\\)"):
        fxtap.cut(model, ["a"])


def test_cut_rejects_unknown_names_and_modes() -> None:
    model = _resnet18()
    with pytest.raises(fxtap.TapNameError, match="layer5"):
        fxtap.cut(model, ["layer5"])
    with pytest.raises(ValueError, match='mode must be "auto" or "fx"'):
        fxtap.cut(model, ["layer3"], mode="hooks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        fxtap.cut(model, [])


# -- export --------------------------------------------------------------------------------------------------------
def test_cut_exports_with_dynamic_batch_onnx_names_torchscript_and_compile(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    model = _resnet18()
    cut = fxtap.cut(model, {"layer4.0.bn2": "mid", "layer3": "c4"}, {"output": "logits"})
    taps = fxtap.tap(model, ["layer4.0.bn2", "layer3"], keep_output=True)(torch.randn(2, 3, 32, 32))
    args = (taps["layer4.0.bn2"].detach(), taps["layer3"].detach())
    for suffix in (".pt2", ".onnx", ".pt"):
        written = fxtap.export(cut, None, args, folder / f"head{suffix}")
        assert written.exists()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "head.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["mid", "c4"]
    batch = torch.export.Dim("batch")
    program = torch.export.export(cut, tuple(torch.cat([a, a]) for a in args), dynamic_shapes={"args": ({0: batch}, {0: batch})})
    assert torch.equal(program.module()(*args)["logits"], taps["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(cut, fullgraph=True, backend="eager")
        assert torch.equal(compiled(*args)["logits"], taps["output"])


class _WrittenThroughAView(nn.Module):
    """``h`` is written in place through a view after the cut, and returned: the cut must return
    the written value (it returned the caller's unwritten tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.aux = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        self.act(h.view(-1, 2, 2))
        return h, self.aux(x)


def test_cut_output_reads_a_cut_input_after_the_cut_writes_into_it() -> None:
    torch.manual_seed(0)
    model = _WrittenThroughAView().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
        given = fxtap.tap(model, ["lin", "aux"])(x)
        kept = given["lin"].clone()
        out = fxtap.cut(model, ["aux", "lin"])(given["aux"], given["lin"])["output"]
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    assert torch.equal(given["lin"], kept)  # the caller's tensor is not the one written


class _ActAfterBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prod = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.prod(x))


def test_cut_output_named_like_its_written_input_is_the_value_before_the_write() -> None:
    torch.manual_seed(0)
    model = _ActAfterBlock().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        given = fxtap.tap(model, ["prod.1"])(x)["prod.1"]
        expected = fxtap.tap(model, ["prod"], keep_output=True)(x)
        out = fxtap.cut(model, ["prod.1"], ["output", "prod"])(given)
    assert torch.equal(out["prod"], expected["prod"]) and torch.equal(out["output"], expected["output"])
    assert out["prod"].min() < 0  # taken before the in-place ReLU


class _WrittenThroughTheCutInput(nn.Module):
    """The cut input is a view of ``h``; an in-place op after the cut writes ``h`` through it, and
    the model returns ``h``, which the cut recomputes from ``x`` (or takes as a second input)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.act(h.view(-1, 2, 2))
        return h


def test_cut_at_a_view_written_in_place_after_the_cut_is_refused() -> None:
    """It returned ``lin(x)`` without the write (found by a random run of the cut+edit property)."""
    model = _WrittenThroughTheCutInput().eval()
    with pytest.raises(fxtap.CutError, match=r"'act' writes into it in place after the cut.*'lin' \(the same memory\)"):
        fxtap.cut(model, ["view"])
    with pytest.raises(fxtap.CutError, match="writes into it in place"):
        fxtap.cut(model, ["view", "lin"])
