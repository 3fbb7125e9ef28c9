"""mode="auto" on the real models of issue 3: models torch.fx cannot trace as a whole.

Random weights, eval mode, small inputs. Two kinds of assertions, kept in separate tests:

* hard requirements (``test_values_*`` and the other value tests): every tapped value equals the
  clone a plain forward hook takes (exactly), the model is left unchanged, and fallback is
  announced with a ``FallbackWarning``. These must hold whatever path fxtap picks.
* paths (``test_paths``): which names go through FX and which through hooks. An untraceable
  root runs eagerly while its traceable children are traced on their own (local tracing), so
  only names inside untraceable code itself go to hooks.
* functional-op names inside locally traced children (``test_functional_names_*``): values equal
  a recomputation from hooked module outputs.

Truth and tap always run under the same grad mode (both with grad, or both under ``no_grad``):
some kernels differ between the two, so values are compared within one mode only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxtap
from support.toy_models import DataDependent
from support.truth import assert_same, assert_unchanged, hook_truth, model_fingerprint, quiet_fallbacks


# -- the models -------------------------------------------------------------------------------------
def _image() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.rand(3, 128, 128)]


@functools.cache
def fasterrcnn() -> nn.Module:
    torch.manual_seed(0)
    # min_size/max_size 128: the default transform would upsample the 128x128 image to 800x800
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()


@functools.cache
def maskrcnn() -> nn.Module:
    torch.manual_seed(0)
    # fewer proposals and detections than the defaults (1000 and 100): the box and mask heads
    # still run (10 detections with masks), in a fraction of the time
    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        min_size=128,
        max_size=128,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=100,
        box_detections_per_img=10,
    ).eval()


@functools.cache
def raft() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.optical_flow.raft_small(weights=None).eval()


def _raft_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)


@functools.cache
def bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    return transformers.BertModel(config).eval()


@functools.cache
def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def _token_ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 100, (2, 8))


def _identity_pre(model: DataDependent) -> DataDependent:
    """Make ``model.pre`` the identity, so the sign of the input picks the gate's branch."""
    with torch.no_grad():
        model.pre.weight.copy_(torch.eye(4))
        model.pre.bias.zero_()
    return model.eval()


@functools.cache
def data_dependent() -> nn.Module:
    torch.manual_seed(0)
    return _identity_pre(DataDependent())


class BranchingRoot(nn.Module):
    """An untraceable root over traceable children (and an untraceable grandchild): the shape of
    the detection and Hugging Face models in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.inner = _identity_pre(DataDependent())
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if x.sum() > 0:  # data-dependent control flow in the root's own code
            x = x + 1
        return self.head(self.inner(x))


@functools.cache
def branching_root() -> nn.Module:
    torch.manual_seed(0)
    return BranchingRoot().eval()


def _positive() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 4) + 0.1


# case -> (model factory, inputs factory (args, kwargs), names, FallbackWarning message pattern)
Inputs = tuple[tuple[Any, ...], dict[str, Any]]
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Inputs], list[str], str]] = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        fasterrcnn,
        lambda: ((_image(),), {}),
        ["backbone.body.3", "backbone.body.13", "backbone.fpn", "rpn.head.conv", "rpn.head.conv_2"],
        "the forward of FasterRCNN itself",
    ),
    "maskrcnn_resnet50_fpn": (
        maskrcnn,
        lambda: ((_image(),), {}),
        ["backbone.body.layer2", "backbone.body.layer2.0.conv1", "backbone.fpn", "rpn.head.conv", "roi_heads.box_head", "roi_heads.mask_head"],
        "the forward of MaskRCNN itself",
    ),
    "raft_small": (
        raft,
        lambda: (_raft_inputs(), {"num_flow_updates": 3}),
        [
            "feature_encoder",
            "context_encoder",
            "context_encoder.layer2.0",
            "update_block.motion_encoder",
            "update_block",
            "update_block.flow_head_2",
        ],
        "the forward of RAFT itself",
    ),
    "bert": (
        bert,
        lambda: ((_token_ids(),), {}),
        ["embeddings", "encoder.layer.0.attention.self", "encoder.layer.1.output.dense", "encoder.layer.1.output", "pooler"],
        "the forward of BertModel itself",
    ),
    "gpt2": (
        gpt2,
        lambda: ((_token_ids(),), {}),
        ["wte", "h.0.mlp", "h.0.mlp.c_fc", "h.1.attn", "ln_f"],
        "the forward of GPT2Model itself",
    ),
    "data_dependent": (
        data_dependent,
        lambda: ((_positive(),), {}),
        ["pre", "gate", "gate.a", "post"],
        r"submodule 'gate' \(Gate\)",
    ),
    "branching_root": (
        branching_root,
        lambda: ((_positive(),), {}),
        ["body.0", "body", "inner.pre", "inner.gate.a", "inner.gate", "inner", "head"],
        "the forward of BranchingRoot itself",
    ),
}

# How each name is captured. The root's own forward is untraceable in all but data_dependent, so
# it runs eagerly while its traceable children are traced on their own: names inside them (and
# their own outputs) are FX; only names that sit in untraceable code itself go to hooks.
PATHS: dict[str, tuple[str, dict[str, str]]] = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        "mixed",
        # rpn.head loops over a list, so it runs eagerly; its conv is a traceable child, called per level
        {"backbone.body.3": "fx", "backbone.body.13": "fx", "backbone.fpn": "fx", "rpn.head.conv": "fx", "rpn.head.conv_2": "fx"},
    ),
    "maskrcnn_resnet50_fpn": ("mixed", dict.fromkeys(CASES["maskrcnn_resnet50_fpn"][2], "fx")),
    "raft_small": (
        "mixed",
        {
            "feature_encoder": "fx",
            "context_encoder": "fx",
            "context_encoder.layer2.0": "fx",
            "update_block.motion_encoder": "fx",
            "update_block": "fx",
            "update_block.flow_head_2": "fx",  # the third call of update_block, served by its graph too
        },
    ),
    "bert": (
        "mixed",
        {"embeddings": "hook", "encoder.layer.0.attention.self": "fx", "encoder.layer.1.output.dense": "fx", "encoder.layer.1.output": "fx", "pooler": "fx"},
    ),
    "gpt2": ("mixed", {"wte": "hook", "h.0.mlp": "fx", "h.0.mlp.c_fc": "fx", "h.1.attn": "fx", "ln_f": "hook"}),
    # only the untraceable submodule is opaque: names inside it are hooked, the rest is FX
    "data_dependent": ("mixed", {"pre": "fx", "gate": "fx", "gate.a": "hook", "post": "fx"}),
    "branching_root": (
        "mixed",
        {"body.0": "fx", "body": "fx", "inner.pre": "fx", "inner.gate.a": "hook", "inner.gate": "fx", "inner": "fx", "head": "hook"},
    ),
}


def _tap(model: nn.Module, names: list[str], match: str, **options: Any) -> fxtap.Tapped:
    with pytest.warns(fxtap.FallbackWarning, match=match):
        return fxtap.tap(model, names, **options)


# -- hard requirements ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c == "maskrcnn_resnet50_fpn" else []) for c in CASES])
def test_values_equal_hook_clones_and_model_unchanged(case: str) -> None:
    factory, inputs, names, match = CASES[case]
    model = factory()
    args, kwargs = inputs()
    before = model_fingerprint(model)
    truth = hook_truth(model, *args, **kwargs)
    tapped = _tap(model, names, match)
    out = tapped(*args, **kwargs)
    assert list(out) == names
    for name in names:
        assert_same(out[name], truth[name])
    again = tapped(*args, **kwargs)  # the cached runner gives the same values
    for name in names:
        assert_same(again[name], truth[name])
    assert_unchanged(before, model)


@pytest.mark.parametrize("case", list(CASES))
def test_names_lists_the_requested_names(case: str) -> None:
    factory, _, names, _ = CASES[case]
    model = factory()
    before = model_fingerprint(model)
    available = set(fxtap.names(model))  # names() silences FallbackWarning itself
    for name in names:
        if name.rsplit("_", 1)[-1].isdigit():
            continue  # later calls of a hooked module are known only once the model runs
        assert name in available, name
    assert_unchanged(before, model)


# -- which path each name takes ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_paths(case: str) -> None:
    factory, _, names, match = CASES[case]
    expected_mode, expected_paths = PATHS[case]
    model = factory()
    tapped = _tap(model, names, match)
    assert tapped.paths == expected_paths
    assert tapped.mode == expected_mode
    rows = {line.split()[0]: line.split() for line in tapped.report().splitlines()[2:]}
    for name, path in expected_paths.items():
        assert rows[name][1:3] == [name, path]  # name, key, path, module type, reason


# -- details per model ------------------------------------------------------------------------------
def test_fasterrcnn_keep_output_runs_the_whole_model() -> None:
    model = fasterrcnn()
    images = _image()
    before = model_fingerprint(model)
    truth = hook_truth(model, images)
    names = ["backbone.body.3", "rpn.head.conv_2", "roi_heads.box_head"]
    tapped = _tap(model, names, "FasterRCNN", keep_output=True)
    out = tapped(images)
    assert list(out) == [*names, "output"]
    for name in [*names, "output"]:
        assert_same(out[name], truth[name])
    assert_unchanged(before, model)


def test_maskrcnn_detach() -> None:
    model = maskrcnn()
    images = _image()
    truth = hook_truth(model, images)
    out = _tap(model, ["backbone.body.layer2"], "MaskRCNN", detach=True)(images)
    assert not out["backbone.body.layer2"].requires_grad
    assert_same(out["backbone.body.layer2"], truth["backbone.body.layer2"])


@pytest.mark.slow  # graphs per non-tensor argument value: tests/capture/test_arguments.py in the default run
def test_raft_default_and_explicit_flow_updates_use_separate_graphs() -> None:
    model = raft()
    a, b = _raft_inputs()
    names = ["feature_encoder", "update_block_2"]
    tapped = _tap(model, names, "RAFT")
    few = tapped(a, b, num_flow_updates=3)
    assert_same(few["update_block_2"], hook_truth(model, a, b, num_flow_updates=3)["update_block_2"])
    with pytest.raises(fxtap.MissingCallError, match="'update_block_2' .from 'update_block', which ran 2 time"):
        tapped(a, b, num_flow_updates=2)  # update_block runs twice: there is no update_block_2


def test_raft_corr_block_never_runs_its_forward() -> None:
    # RAFT calls corr_block's methods (build_pyramid, index_pyramid), never corr_block(...):
    # a forward hook cannot see it.
    model = raft()
    a, b = _raft_inputs()
    tapped = _tap(model, ["corr_block"], "RAFT")
    with pytest.raises(fxtap.MissingCallError, match="'corr_block'.*ran 0 time"):
        tapped(a, b, num_flow_updates=1)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_bert_values_in_either_grad_mode(grad: bool) -> None:
    model = bert()
    ids = _token_ids()
    names = ["encoder.layer.1.output.dense", "pooler"]
    tapped = _tap(model, names, "BertModel")
    with torch.set_grad_enabled(grad):
        truth = hook_truth(model, ids)
        out = tapped(ids)
    for name in names:
        assert_same(out[name], truth[name])
        assert out[name].requires_grad == grad


def test_bert_gradients_flow_through_hooked_values() -> None:
    model = bert()
    ids = _token_ids()
    out = _tap(model, ["encoder.layer.1.output.dense"], "BertModel")(ids)
    weight = model.encoder.layer[1].output.dense.weight
    (grad,) = torch.autograd.grad(out["encoder.layer.1.output.dense"].sum(), weight)
    assert grad.shape == weight.shape and grad.abs().sum() > 0


def test_bert_keep_output_and_keyword_inputs() -> None:
    model = bert()
    ids = _token_ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    truth = hook_truth(model, input_ids=ids, attention_mask=mask)
    out = _tap(model, ["encoder.layer.0.output"], "BertModel", keep_output=True)(input_ids=ids, attention_mask=mask)
    assert_same(out["encoder.layer.0.output"], truth["encoder.layer.0.output"])
    assert_same(out["output"]["last_hidden_state"], truth["output"]["last_hidden_state"])
    assert_same(out["output"]["pooler_output"], truth["output"]["pooler_output"])


def test_gpt2_repeated_tap_is_independent() -> None:
    model = gpt2()
    ids = _token_ids()
    first = _tap(model, ["h.0.mlp"], "GPT2Model")(ids)
    second = _tap(model, ["h.0.mlp", "h.1.mlp"], "GPT2Model")(ids)
    assert_same(second["h.0.mlp"], first["h.0.mlp"].detach())


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["branch_a", "branch_b"])
def test_data_dependent_follows_the_branch_that_ran(sign: float) -> None:
    model = data_dependent()
    x = sign * _positive()
    taken, other = ("gate.a", "gate.b") if sign > 0 else ("gate.b", "gate.a")
    before = model_fingerprint(model)
    truth = hook_truth(model, x)
    assert taken in truth and other not in truth
    names = ["pre", "gate", taken, "post"]
    tapped = _tap(model, names, r"submodule 'gate' \(Gate\)", keep_output=True)
    out = tapped(x)
    for name in [*names, "output"]:
        assert_same(out[name], truth[name])
    with pytest.raises(fxtap.MissingCallError, match=repr(other)), pytest.warns(fxtap.FallbackWarning):
        fxtap.tap(model, [other])(x)
    assert_unchanged(before, model)


# -- functional ops inside children traced on their own ---------------------------------------------
def test_functional_names_inside_local_regions_maskrcnn() -> None:
    model = maskrcnn()
    image = _image()
    truth = hook_truth(model, image)
    names = ["backbone.body.layer2.0.add", "backbone.body.layer1.1.relu_2"]
    tapped = _tap(model, names, "the forward of MaskRCNN itself")
    assert tapped.paths == dict.fromkeys(names, "fx")
    out = tapped(image)
    assert_same(out["backbone.body.layer2.0.add"], truth["backbone.body.layer2.0.bn3"] + truth["backbone.body.layer2.0.downsample"])
    assert_same(out["backbone.body.layer1.1.relu_2"], truth["backbone.body.layer1.1"])


def test_functional_names_inside_local_regions_bert() -> None:
    model = bert()
    ids = _token_ids()
    truth = hook_truth(model, ids)
    names = ["encoder.layer.0.output.add", "encoder.layer.1.output.LayerNorm"]
    tapped = _tap(model, names, "the forward of BertModel itself")
    assert tapped.paths == dict.fromkeys(names, "fx")
    out = tapped(ids)
    attention = truth["encoder.layer.0.attention"]
    attention = attention[0] if isinstance(attention, tuple) else attention
    assert_same(out["encoder.layer.0.output.add"], truth["encoder.layer.0.output.dropout"] + attention)
    assert_same(out["encoder.layer.1.output.LayerNorm"], truth["encoder.layer.1.output.LayerNorm"])


@pytest.mark.parametrize("mode", ["hooks", "auto"])
def test_maskrcnn_roi_heads_container_is_copied_before_postprocessing(mode: str) -> None:
    """roi_heads returns a list of dicts that GeneralizedRCNN's postprocess rewrites in place."""
    model = maskrcnn()
    torch.manual_seed(2)
    image = [torch.rand(3, 96, 160)]  # resized to 128 px and back: postprocess rescales the boxes
    truth = hook_truth(model, image)
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["roi_heads"], mode=mode, keep_output=True)
    out = tapped(image)
    raw = truth["roi_heads"][0][0]["boxes"]
    assert raw.shape[0] > 0
    assert_same(out["roi_heads"], truth["roi_heads"])
    assert not torch.equal(out["roi_heads"][0][0]["boxes"], out["output"][0]["boxes"])  # the rescaled ones
