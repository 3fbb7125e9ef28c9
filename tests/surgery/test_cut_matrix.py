"""fxtap.cut on the real-model matrix: for every model whose names are all FX, random cut points.

For each model of ``registry.CASES`` with mode "fx" (41 models), tap names of the FX graph are
drawn (seeded by the model's name) among those whose value is one tensor, until two cuts were
checked (a cut refused for an in-place write it cannot reproduce, a documented ``CutError``,
counts as neither; at least one must be checked). The model is cut there, the values
that ``fxtap.cut`` reports missing are added (a multi-input cut for skips), and the cut's outputs
(the model's output and a name after the cut) must equal the full model's exactly (eval mode).
A few small models run by default; ``--runslow`` runs them all.
"""

from __future__ import annotations

import random
import warnings

import pytest
from support import cuts
from support.registry import CASES, Case

import fxtap
from fxtap._capture import describe

FX_CASES = [case for case in CASES.values() if case.mode == "fx"]
DEFAULT = {"torchvision/resnet18", "torchvision/mobilenet_v3_small", "timm/vit_tiny_patch16_224"}


def test_matrix_has_enough_fx_models() -> None:
    assert len(FX_CASES) >= 35


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[] if c.name in DEFAULT else [pytest.mark.slow]) for c in FX_CASES]
)
def test_cut_at_random_points_equals_model(case: Case) -> None:
    model = case.build()
    args, kwargs = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        listed = [info.name for info in describe(model) if info.path == "fx"]  # not names inside torch.nn leaves
    rng = random.Random(case.name)
    candidates = rng.sample(listed[1:], min(len(listed) - 1, 16))
    tensors = cuts.tensor_names(model, args, kwargs, candidates)  # one forward for all of them
    points = [n for n in candidates if n in tensors]
    done = 0
    for point in points:
        if done == 2:
            break
        later = [n for n in points if listed.index(n) > listed.index(point)][:1] if done else []
        if cuts.check(model, args, kwargs, point, ["output", *later]) is not None:  # None: refused, see cuts.build
            done += 1
    assert done >= 1, f"every cut among the tensor-valued names {points} was refused"
