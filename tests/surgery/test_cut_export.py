"""fxtap.cut on a model only the torch.export frontend captures (issue 17): a cut is one FX graph,
so it is refused with the reason and the way out; the way out it names (patch the value into the
whole model) gives the values a cut would, checked against plain forward hooks."""

from __future__ import annotations

import pytest
import torch
from support.registry import CASES
from support.truth import quiet_fallbacks

import fxtap


def test_cut_of_export_captured_model_names_reason_and_way_out() -> None:
    model = CASES["transformers/BertModel"].build().eval()
    with pytest.raises(fxtap.TraceFailedError) as raised:
        fxtap.cut(model, ["encoder.layer.0"], ["encoder.layer.1"])
    message = str(raised.value)
    assert message.startswith("cannot cut BertModel: a cut is one torch.fx graph, and torch.fx cannot trace the forward of BertModel itself: TraceError")
    assert "one torch.export graph for tap, edit and export" in message
    assert "fxtap.tap(model, ['encoder.layer.1'], edit={'encoder.layer.0': value})(*model_inputs)" in message
    with pytest.raises(fxtap.TraceFailedError, match=r"fxtap\.edit\(model, \{'encoder\.layer\.0': value\}\)"):
        fxtap.cut(model, ["encoder.layer.0"])


def test_cut_way_out_patches_the_value_in_one_export_graph() -> None:
    model = CASES["transformers/BertModel"].build().eval()
    sentence, other = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["encoder.layer.0"])
        value = tapped(other)["encoder.layer.0"].detach()  # the cut input's value, from another sentence
        patched = fxtap.tap(model, ["encoder.layer.1"], edit={"encoder.layer.0": value})
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.encoder.layer[0].register_forward_hook(lambda m, i, o: value),
        model.encoder.layer[1].register_forward_hook(lambda m, i, o: seen.update(v=o.detach().clone())),
    ]
    try:
        with torch.no_grad():
            model(sentence)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        patched(sentence)
        out = patched(sentence)
    assert patched.mode == "export"
    torch.testing.assert_close(out["encoder.layer.1"], seen["v"], rtol=0, atol=0)
