"""``feature_info.reduction`` is the product of the strides along the path (#18 item 8), as timm
reports it, also where padding or valid convolutions make the size ratio wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxtap


def test_valid_convolutions_report_their_strides() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 5, 3, stride=2), nn.Conv2d(5, 6, 3, stride=2))
    body = fxtap.backbone(model, ["0", "1", "2"], torch.randn(1, 3, 30, 30))  # 30 -> 14 -> 6 -> 2
    assert [(f.channels, f.reduction) for f in body.feature_info] == [(4, 2), (5, 4), (6, 8)]


def test_model_fixed_to_its_input_size_keeps_the_size_ratio() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.shape[-1] == 32, "32 pixels only")
            return self.conv(x)

    body = fxtap.backbone(Fixed(), ["conv"], torch.randn(1, 3, 32, 32))
    assert [f.reduction for f in body.feature_info] == [2]


@pytest.mark.slow  # 90 s on a loaded 2-core machine: create_model twice, a trace with fallbacks
def test_timm_inception_v3_reductions_equal_timms() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False).eval()
    info = timm.create_model("inception_v3", pretrained=False, features_only=True).feature_info
    body = fxtap.backbone(model, info.module_name(), torch.randn(1, 3, 107, 107))
    assert [f.reduction for f in body.feature_info] == info.reduction() == [2, 4, 8, 16, 32]
    assert [f.channels for f in body.feature_info] == info.channels()
