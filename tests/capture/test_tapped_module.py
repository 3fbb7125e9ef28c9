"""The Tapped as a module (#18 items 7 and 8): its mode is the model's, its graph scripts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxtap


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4, 2))


def test_training_mirrors_the_model() -> None:
    model = _model()
    tapped = fxtap.tap(model, ["1"])
    assert tapped.training and model.training
    model.eval()
    assert tapped.training is False
    tapped.train()
    assert model.training and all(m.training for m in model.modules())
    tapped.eval()
    assert not model.training and not any(m.training for m in model.modules())
    twin = copy.deepcopy(tapped)
    assert twin.training is False and twin.model is not model
    twin.model.train()
    assert twin.training and not tapped.training


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("detach", [False, True])
def test_graph_with_copies_and_detach_scripts(train: bool, detach: bool) -> None:
    model = _model().train(train)
    tapped = fxtap.tap(model, ["1", "3"], detach=detach)  # "1" is overwritten in place by the ReLU: copied
    graph = tapped.graph_module()
    assert any("copy_value" in str(n.target) for n in graph.graph.nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(graph)
    x = torch.randn(8, 4)
    torch.manual_seed(1)
    got = scripted(x)
    torch.manual_seed(1)
    expected = graph(x)
    for key in ("1", "3"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert got["1"].requires_grad is (not detach)


class _Masked(nn.Module):
    """A forward with arguments fixed at their defaults: an optional mask (``None``) and a flag,
    annotated as strings (this file has ``from __future__ import annotations``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False, scale: float = 1.0) -> torch.Tensor:
        y = self.lin(x) * scale
        if mask is not None:
            y = y + mask
        return y.flip(0) if causal else y.relu()


def test_graph_with_arguments_fixed_at_defaults_scripts() -> None:
    model = _Masked()
    graph = fxtap.tap(model, ["lin"], keep_output=True).graph_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(graph)
    x = torch.randn(3, 4)
    torch.testing.assert_close(scripted(x), graph(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted(x)["output"], model(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="mask has been specialized"):  # the guard still runs
        scripted(x, torch.ones(3, 4))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_graph_scripts(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2).train(name.startswith("deit"))
    tapped = fxtap.tap(model, ["blocks.0", "blocks.1.attn", "head"])
    assert tapped.mode == "fx"
    graph = tapped.graph_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; timm warns on tracing
        scripted = torch.jit.script(graph)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    got = scripted(x)
    torch.manual_seed(1)
    expected = tapped(x)
    for key in ("blocks.0", "blocks.1.attn", "head"):
        torch.testing.assert_close(got[key], expected[key])
