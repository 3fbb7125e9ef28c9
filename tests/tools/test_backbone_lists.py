"""``fxtap.backbone`` on modules that return a list or tuple (#18 item 8): ``"<name>.<i>"`` picks
element ``i``; the whole list is refused with the element names to use. The truth is the
module's own output, taken by a forward hook on the eager model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxtap


class _Pair(nn.Module):
    def __init__(self, cin: int, cout: int, as_tuple: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(cin, cout // 2, 1, stride=2)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        out = [self.conv(x).relu(), self.skip(x)]
        return tuple(out) if self.as_tuple else out  # type: ignore[return-value]


class _Net(nn.Module):
    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())  # "stem.0" is a module: not an element
        self.block = _Pair(8, 16, as_tuple)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, _ = self.block(self.stem(x))
        return self.head(main)


def _eager(model: nn.Module, path: str, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.extend(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("as_tuple", [False, True], ids=["list", "tuple"])
def test_backbone_picks_elements_of_a_list_output(as_tuple: bool) -> None:
    torch.manual_seed(0)
    model = _Net(as_tuple).eval()
    x = torch.randn(2, 3, 32, 32)
    body = fxtap.backbone(model, {"stem.0": "s", "block.0": "main", "block.1": "skip"}, x)
    assert [(f.key, f.name, f.channels, f.reduction) for f in body.feature_info or []] == [
        ("s", "stem.0", 8, 1), ("main", "block.0", 16, 2), ("skip", "block.1", 8, 2)
    ]
    main, skip = _eager(model, "block", x)
    with torch.no_grad():
        out = body(x)
        graph_out = body.graph_module()(x)
    assert list(out) == ["s", "main", "skip"] and list(graph_out) == ["s", "main", "skip"]
    for got in (out, graph_out):
        assert torch.equal(got["main"], main) and torch.equal(got["skip"], skip)
        assert torch.equal(got["s"], model.stem[0](x))


def test_backbone_refuses_a_whole_list_and_says_which_names_to_pick() -> None:
    model = _Net(False).eval()
    with pytest.raises(TypeError, match=r"'block' .*returns a list of 2 tensors(.|\n)*block\.0: \(1, 16, 16, 16\)(.|\n)*'block\.0'"):
        fxtap.backbone(model, ["block"], torch.randn(1, 3, 32, 32))
    with pytest.raises(fxtap.TapNameError, match=r"'block' returns a list of 2 values; pick block\.0 to block\.1"):
        fxtap.backbone(model, ["block.2"], torch.randn(1, 3, 32, 32))
    with pytest.raises(fxtap.TapNameError, match="no tap named 'head.0'"):
        fxtap.backbone(model, ["head.0"], torch.randn(1, 3, 32, 32))


def test_backbone_picks_timm_selecsls_block_outputs() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("selecsls42b", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    body = fxtap.backbone(model, ["features.1.0", "features.3.0"], x)
    assert [(f.channels, f.reduction) for f in body.feature_info or []] == [(128, 4), (288, 8)]
    with torch.no_grad():
        out = body(x)
    assert torch.equal(out["features.1.0"], _eager(model, "features.1", x)[0])
    assert torch.equal(out["features.3.0"], _eager(model, "features.3", x)[0])
