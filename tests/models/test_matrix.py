"""The real-model matrix (issue 8): fxtap.tap(mode="auto") on the model zoos people use.

Each model of ``registry.CASES`` (random weights, small inputs) goes through ``matrix.check``:
names picked through the whole graph, plus every call of every module that runs more than once;
module names equal clones taken in forward hooks as the module returned, functional-op names
equal the op recomputed eagerly, the model is unchanged, and ``Tapped.mode`` is the expected one.
A fast, diverse subset runs by default; ``--runslow`` runs every model. docs/models.md is the
same matrix with measured numbers (``python docs/gen_models.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

from support import matrix
import pytest
from support.registry import CASES, Case

ROOT = Path(__file__).resolve().parents[2]


def _param(case: Case) -> object:
    marks: list[pytest.MarkDecorator] = []
    if case.slow:
        marks.append(pytest.mark.slow)
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail, raises=case.raises))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES.values()])
def test_model(case: Case, record_property: pytest.RecordProperty) -> None:
    result = matrix.check(case)
    record_property("mode", result.mode)
    record_property("fx_names", f"{result.fx_names}/{len(result.names)}")
    record_property("fx_leaf_modules", f"{result.leaf_fx}/{result.leaf_total}")
    record_property("tap_s", round(result.tap_s, 3))
    assert result.mode == case.mode, f"expected mode {case.mode!r}, got {result.mode!r}: {result.paths}"


# names(model, inputs) on every model is --runslow (it taps every name); by default, two models
# whose static names() lists modules a call skips (fused attention's dropout)
NAMES_DEFAULT = frozenset({"transformers/BertModel", "transformers/GPT2Model"})


def _names_param(case: Case) -> object:
    return pytest.param(case, id=case.name, marks=[] if case.name in NAMES_DEFAULT else [pytest.mark.slow])


@pytest.mark.parametrize("case", [_names_param(case) for case in CASES.values()])
def test_model_names_with_inputs(case: Case) -> None:
    """tap(model, names(model, inputs)) returns every name, equal to eager (issue 17)."""
    matrix.check_names(case)


_NAMES_ALONE_DEFAULT = ("transformers/BertModel", "torchvision/vit_b_16")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[] if c.name in _NAMES_ALONE_DEFAULT else [pytest.mark.slow]) for c in CASES.values() if not c.xfail],
)
def test_model_names_without_inputs(case: Case) -> None:
    """tap(model, names(model)) on every row of the matrix: every name it lists is produced, equal
    to eager (issue 17; a Hugging Face model's ``dummy_inputs`` tell which modules its eager code
    calls, and nn.MultiheadAttention's out_proj is never called)."""
    matrix.check_names(case, with_inputs=False, never_called=set())


ISSUE_8 = {
    "torchvision": """
        resnet18 resnet50 wide_resnet50_2 resnext50_32x4d mobilenet_v2 mobilenet_v3_small efficientnet_b0
        efficientnet_v2_s regnet_y_400mf convnext_tiny densenet121 googlenet inception_v3 squeezenet1_0
        shufflenet_v2_x0_5 mnasnet0_5 vgg11_bn alexnet vit_b_16 swin_t swin_v2_t maxvit_t r3d_18 s3d mvit_v2_s
        deeplabv3_mobilenet_v3_large fcn_resnet50 lraspp_mobilenet_v3_large fasterrcnn_mobilenet_v3_large_fpn
        maskrcnn_resnet50_fpn retinanet_resnet50_fpn ssdlite320_mobilenet_v3_large keypointrcnn_resnet50_fpn raft_small
    """,
    "timm": """
        resnet18 efficientnet_b0 vit_tiny_patch16_224 deit_tiny_patch16_224 swin_tiny_patch4_window7_224
        convnext_atto mobilevitv2_050 levit_128s regnetx_002 fastvit_t8 eva02_tiny_patch14_224 coat_lite_tiny nfnet_l0
    """,
    "transformers": "BertModel GPT2Model ViTModel CLIPVisionModel LlamaModel T5EncoderModel WhisperEncoder",
}
ISSUE_17 = "GPT2Model+cache LlamaModel+cache MistralModel Qwen2Model ModernBertModel"  # decoders returning their cache, newer architectures


def test_registry_is_the_issue_list() -> None:
    wanted = [f"{family}/{name}" for family, names in ISSUE_8.items() for name in names.split()]
    wanted += [f"transformers/{name}" for name in ISSUE_17.split()]
    assert list(CASES) == wanted


def test_default_run_is_a_diverse_subset() -> None:
    fast = [case for case in CASES.values() if not case.slow]
    assert 12 <= len(fast) <= 16
    assert {case.family for case in fast} == {"torchvision", "timm", "transformers"}
    assert {case.mode for case in fast} >= {"fx", "mixed"}


def test_every_failure_is_a_documented_strict_xfail() -> None:
    for case in CASES.values():
        if case.xfail:
            assert case.xfail.startswith(("fxtap bug: ", "unsupported: ")), case.name


def test_docs_table_lists_every_model() -> None:
    text = (ROOT / "docs" / "models.md").read_text()
    assert "python docs/gen_models.py" in text  # says how it is generated
    rows = re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE)
    assert rows == list(CASES)
