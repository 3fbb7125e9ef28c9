"""TorchScript of fxtap's graphs where torchvision's extractor scripts (#18 item 8), over
torchvision's whole classification zoo: slow (every model is built and traced twice)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)

import fxtap

MODELS = torchvision.models.list_models(module=torchvision.models)


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; models warn on tracing
        return torch.jit.script(module)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_graph_scripts_where_torchvisions_does(name: str, train: bool) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        known = set(fxtap.names(model))
    nodes = [n for n in get_graph_node_names(model)[0 if train else 1] if n in known]  # names both give the same meaning
    wanted = [n for n in nodes[len(nodes) // 2 :: max(1, len(nodes) // 6)] if n != "x"][:3]
    try:
        _script(create_feature_extractor(model, wanted))
    except Exception:  # noqa: BLE001 - torchvision's own graph does not script: nothing to match
        pytest.skip("torchvision's extractor does not script these nodes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, wanted)
    if tapped.mode != "fx":
        pytest.skip(f"fxtap captures some of {wanted} with hooks: no single graph")
    _script(tapped.graph_module())
