"""fxtap.export and Tapped.graph_module() for models only the torch.export frontend captures
(Hugging Face models, issue 17): each written file is loaded back here and compared, at sizes
other than the example's, with clones taken by plain forward hooks (no fxtap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch
from support.registry import CASES
from support.truth import hook_truth, quiet_fallbacks
from torch import nn

import fxtap

ATOL, RTOL = 1e-4, 1e-5

# model, tap names -> keys, example kind ("text": input_ids + attention_mask as keywords, "image": one tensor)
_MODELS = {
    "transformers/BertModel": ({"encoder.layer.0": "l0", "encoder.layer.1.output.dense": "dense", "pooler": "pooled"}, "text"),
    "transformers/GPT2Model": ({"h.0": "h0", "h.1.mlp": "mlp1"}, "text"),
    "transformers/LlamaModel": ({"layers.0": "l0", "norm": "norm"}, "text"),
    "transformers/ViTModel": ({"pooler": "pooled"}, "image"),
}
_FAST = {("transformers/BertModel", "onnx")}  # GPT2Model/pt2 (12 s) and the rest: --runslow


def _example(name: str, kind: str, batch: int, length: int) -> dict[str, Any] | torch.Tensor:
    torch.manual_seed(batch * 100 + length)
    if kind == "image":
        return torch.randn(batch, 3, 32, 32)
    ids = torch.randint(0, 100, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding in the first row
    example: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if name == "transformers/GPT2Model":
        example["use_cache"] = False
    return example


def _call(example: dict[str, Any] | torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((), example) if isinstance(example, dict) else ((example,), {})


def _run_file(path: Path, example: dict[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
    args, kwargs = _call(example)
    if path.suffix == ".pt2":
        out = torch.export.load(path).module()(*args, **kwargs)
        return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = {key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)} or {"pixel_values": args[0]}
    results = session.run(None, {i.name: tensors[i.name].numpy() for i in session.get_inputs()})
    return {o.name: torch.from_numpy(r) for o, r in zip(session.get_outputs(), results)}


def _expected(model: nn.Module, names: dict[str, str], example: dict[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
    args, kwargs = _call(example)
    with torch.no_grad():
        truth = hook_truth(model, *args, **kwargs)
    return {key: truth[name] for name, key in names.items()}


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        pytest.param(name, fmt, marks=() if (name, fmt) in _FAST else pytest.mark.slow)
        for name in _MODELS
        for fmt in ("pt2", "onnx")
    ],
)
def test_export_hf_file_matches_eager_at_other_sizes(name: str, fmt: str, tmp_path: Path) -> None:
    model = CASES[name].build().eval()
    names, kind = _MODELS[name]
    path = fxtap.export(model, names, _example(name, kind, 2, 8), tmp_path / f"taps.{fmt}")
    others = [(3, 8), (2, 13)] if kind == "text" else [(3, 0)]  # another batch; another sequence length
    for batch, length in others:
        example = _example(name, kind, batch, length)
        got, want = _run_file(path, example), _expected(model, names, example)
        assert list(got) == list(want)  # the outputs are named by the keys, in order
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_export_hf_torchscript_names_the_way_out(tmp_path: Path) -> None:
    model = CASES["transformers/BertModel"].build().eval()
    with pytest.raises(fxtap.FxtapError, match=r"cannot write the taps of BertModel as TorchScript.*\n.*pt2.*ONNX"):
        fxtap.export(model, ["pooler"], _example("transformers/BertModel", "text", 2, 8), tmp_path / "taps.pt")
    assert not (tmp_path / "taps.pt").exists()


def test_export_hf_refused_export_says_why(tmp_path: Path) -> None:
    model = CASES["transformers/GPT2Model"].build().eval()
    example = _example("transformers/GPT2Model", "text", 2, 8)
    with pytest.raises(fxtap.FxtapError, match=r"(?s)cannot export the taps of GPT2Model.*torch\.export could not capture the call either: .*function edit"):
        fxtap.export(model, ["h.1"], example, tmp_path / "taps.pt2", edit={"h.0.mlp": lambda v: v * 2})
    assert not (tmp_path / "taps.pt2").exists()


@pytest.mark.slow
def test_export_hf_with_a_module_edit(tmp_path: Path) -> None:
    model = CASES["transformers/GPT2Model"].build().eval()
    steer = nn.Linear(32, 32)
    example = _example("transformers/GPT2Model", "text", 2, 8)
    path = fxtap.export(model, {"h.1": "h1"}, example, tmp_path / "taps.pt2", edit={"h.0.mlp": steer})
    other = _example("transformers/GPT2Model", "text", 3, 5)
    handle = model.h[0].mlp.register_forward_hook(lambda m, i, o: steer(o))
    try:
        want = _expected(model, {"h.1": "h1"}, other)
    finally:
        handle.remove()
    torch.testing.assert_close(_run_file(path, other)["h1"], want["h1"], atol=ATOL, rtol=RTOL)


def test_graph_module_of_export_captured_model() -> None:
    name = "transformers/BertModel"
    model = CASES[name].build().eval()
    names = {"encoder.layer.0": "l0", "pooler": "pooled"}
    with quiet_fallbacks():
        tapped = fxtap.tap(model, names)
    with pytest.raises(fxtap.FxtapError, match=r"no torch\.export graph of the taps of BertModel yet.*\n.*Call the Tapped once"):
        tapped.graph_module()
    tapped(**_example(name, "text", 2, 8))  # type: ignore[arg-type]
    graph = tapped.graph_module()
    assert isinstance(graph, torch.fx.GraphModule)
    assert {id(p) for p in graph.parameters()} <= {id(p) for p in model.parameters()}  # shared, not copied
    other = _example(name, "text", 3, 11)
    with torch.no_grad():
        got = graph(**other)  # type: ignore[arg-type]
    want = _expected(model, names, other)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)


def test_graph_module_of_export_captured_model_fixes_non_tensor_arguments() -> None:
    name = "transformers/GPT2Model"
    model = CASES[name].build().eval()
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["h.0"])
    tapped(**_example(name, "text", 2, 8))  # type: ignore[arg-type]
    graph = tapped.graph_module()
    example = _example(name, "text", 2, 8)
    assert isinstance(example, dict)
    with pytest.raises(Exception, match=r"use_cache"):  # baked in at False: another value is refused
        graph(**{**example, "use_cache": True})


def test_graph_module_of_a_call_export_refused_says_why() -> None:
    name = "transformers/GPT2Model"
    model = CASES[name].build().eval()
    with quiet_fallbacks():
        tapped = fxtap.tap(model, ["h.0"], edit={"h.1.mlp": lambda v: v})
    tapped(**_example(name, "text", 2, 8))  # type: ignore[arg-type]
    with pytest.raises(fxtap.FxtapError, match=r"no single graph computes these taps of GPT2Model.*function edit"):
        tapped.graph_module()
