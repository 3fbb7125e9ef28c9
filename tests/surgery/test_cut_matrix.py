"""fxtap.cut on the real-model matrix: for every model whose names are all FX, random cut points.

For each model of ``registry.CASES`` with mode "fx" (41 models), two tap names are drawn (seeded
by the model's name) among those whose value is one tensor. The model is cut there, the values
that ``fxtap.cut`` reports missing are added (a multi-input cut for skips), and the cut's outputs
(the model's output and a name after the cut) must equal the full model's exactly (eval mode).
A few small models run by default; ``--runslow`` runs them all.
"""

from __future__ import annotations

import random
import warnings

import pytest

import fxtap
from support import cuts
from support.registry import CASES, Case

FX_CASES = [case for case in CASES.values() if case.mode == "fx"]
DEFAULT = {"torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/r3d_18", "timm/vit_tiny_patch16_224"}


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
        listed = fxtap.names(model)
    rng = random.Random(case.name)
    candidates = rng.sample(listed[1:], min(len(listed) - 1, 12))
    done = 0
    for point in candidates:
        if done == 2:
            break
        if not cuts.is_tensor(model, args, kwargs, point):
            continue
        later = rng.sample(listed[listed.index(point) + 1 :], min(4, len(listed) - listed.index(point) - 1)) if done else []
        tensors = [n for n in later if cuts.is_tensor(model, args, kwargs, n)][:1]
        outputs = ["output", *tensors]  # the second cut also returns a value after it
        if cuts.check(model, args, kwargs, point, outputs) is not None:  # None: refused, see cuts.build
            done += 1
    assert done == 2, f"fewer than two tensor-valued names among {candidates}"
