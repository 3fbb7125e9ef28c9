"""``fxtap.edit`` on real models, each against a hand-written eager version of the same edit.

resnet (zero a residual ``add``; patch ``layer2`` with its value for another image), vit_b_16
(steer an encoder layer by a vector; ablate one attention output), and Hugging Face BERT from a
small config (patch one layer's output with its value for another sentence; an op edit inside
a layer too, in mixed mode), and GPT2 from a small config (patch ``h.0.mlp`` from another sentence
and scale the residual ``h.1.add``; the refusals of ops in eager code name what can be edited).
weights=None, small inputs; the large models are marked slow.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxtap


def _bottleneck(block: nn.Module, x: torch.Tensor, at_add: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """torchvision's Bottleneck/BasicBlock forward written out, with ``at_add`` applied to ``out += identity``."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return block.relu(at_add(out + identity))


def _resnet(model: nn.Module, x: torch.Tensor, edits: dict[str, Any]) -> torch.Tensor:
    """ResNet's forward by hand: ``edits`` maps "layerK.i.add" to a function, "layerK" to a tensor."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for k in range(1, 5):
        layer = getattr(model, f"layer{k}")
        for i, block in enumerate(layer):
            x = _bottleneck(block, x, edits.get(f"layer{k}.{i}.add", lambda v: v))
        if f"layer{k}" in edits:
            x = edits[f"layer{k}"]
    return model.fc(torch.flatten(model.avgpool(x), 1))


def _layer2(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer2(model.layer1(x))


def _check_resnet(arch: str, add: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x, other = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ablated = fxtap.edit(model, {add: torch.zeros_like})
        torch.testing.assert_close(ablated(x), _resnet(model, x, {add: torch.zeros_like}), rtol=0, atol=0)
        cache = _layer2(model, other)
        saved = cache.clone()
        patched = fxtap.edit(model, {"layer2": cache})
        torch.testing.assert_close(patched(x), _resnet(model, x, {"layer2": cache}), rtol=0, atol=0)
    torch.testing.assert_close(cache, saved, rtol=0, atol=0)
    assert ablated.mode == patched.mode == "fx"


def test_edit_resnet18_ablate_add_and_patch_layer() -> None:
    _check_resnet("resnet18", "layer3.1.add")


@pytest.mark.slow
def test_edit_resnet50_ablate_add_and_patch_layer() -> None:
    _check_resnet("resnet50", "layer3.2.add")


def _vit(model: nn.Module, x: torch.Tensor, steer: dict[int, torch.Tensor], ablate: int | None) -> torch.Tensor:
    """torchvision's VisionTransformer forward by hand, steering the output of some layers and
    zeroing one layer's self-attention output."""
    x = model._process_input(x)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    encoder = model.encoder
    x = encoder.dropout(x + encoder.pos_embedding)
    for i, layer in enumerate(encoder.layers):
        if i == ablate:
            h = layer.ln_1(x)
            attention, _ = layer.self_attention(h, h, h, need_weights=False)
            h = layer.dropout(torch.zeros_like(attention)) + x
            x = h + layer.mlp(layer.ln_2(h))
        else:
            x = layer(x)
        if i in steer:
            x = x + steer[i]
    return model.heads(encoder.ln(x)[:, 0])


@pytest.mark.slow
def test_edit_vit_b_16_steer_and_ablate_attention() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    x, vector = torch.randn(1, 3, 32, 32), torch.randn(768)
    with torch.no_grad():
        steered = fxtap.edit(model, {"encoder.layers.encoder_layer_5": lambda h: h + vector})
        torch.testing.assert_close(steered(x), _vit(model, x, {5: vector}, None), rtol=1e-5, atol=1e-5)
        name = "encoder.layers.encoder_layer_3.self_attention"
        ablated = fxtap.edit(model, {name: lambda out: (torch.zeros_like(out[0]), out[1])})
        torch.testing.assert_close(ablated(x), _vit(model, x, {}, 3), rtol=1e-5, atol=1e-5)
    assert steered.mode == ablated.mode == "fx"


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertModel(config).eval()


def test_edit_bert_patch_layer_from_another_sentence_in_mixed_mode() -> None:
    model = _bert()
    sentence, other = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    # by hand, without fxtap: a plain forward hook caches layer 0 for the other sentence, then
    # returns that cache; a pre-hook on LayerNorm halves its input, the residual add of layer 1
    cache: dict[str, torch.Tensor] = {}
    handle = model.encoder.layer[0].register_forward_hook(lambda m, i, o: cache.update(v=o.detach().clone()))
    with torch.no_grad():
        model(other)
    handle.remove()
    handles = [
        model.encoder.layer[0].register_forward_hook(lambda m, i, o: cache["v"]),
        model.encoder.layer[1].attention.output.LayerNorm.register_forward_pre_hook(lambda m, i: (i[0] * 0.5,)),
    ]
    try:
        with torch.no_grad():
            expected = model(sentence).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    edits = {"encoder.layer.0": cache["v"], "encoder.layer.1.attention.output.add": lambda v: v * 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        edited = fxtap.edit(model, edits)
        tapped = fxtap.tap(model, ["encoder.layer.1.output.add", "encoder.layer.0"], edit=edits)
    with torch.no_grad():
        torch.testing.assert_close(edited(sentence).last_hidden_state, expected, rtol=0, atol=0)
        taps = tapped(sentence)
    assert edited.mode == "mixed"  # the root runs eagerly; the encoder is traced on its own, edits in its graph
    assert edited.paths == {"encoder.layer.0": "fx", "encoder.layer.1.attention.output.add": "fx"}
    torch.testing.assert_close(taps["encoder.layer.0"], cache["v"], rtol=0, atol=0)
    by_hooks = fxtap.edit(model, {"encoder.layer.0": cache["v"]}, mode="hooks")
    with torch.no_grad():
        torch.testing.assert_close(by_hooks(sentence).last_hidden_state, expected_patch_only(model, sentence, cache["v"]), rtol=0, atol=0)


def expected_patch_only(model: nn.Module, sentence: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    handle = model.encoder.layer[0].register_forward_hook(lambda m, i, o: value)
    try:
        return model(sentence).last_hidden_state
    finally:
        handle.remove()


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def _gpt2_by_hand(model: nn.Module, sentence: torch.Tensor, mlp0: torch.Tensor | None, residual1: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """GPT2 with hooks only, no fxtap: ``h.0.mlp``'s output replaced by ``mlp0``; in block 1, the
    lines after the attention call written out (GPT2Block.forward) with ``residual1`` applied to
    ``attn_output + residual``, the value every later line of the block reads."""
    seen: dict[str, torch.Tensor] = {}
    block = model.h[1]

    def block1(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        hidden = residual1(seen["attn"] + args[0])  # type: ignore[misc]
        seen["h.1.add"] = hidden.clone()
        return hidden + block.mlp(block.ln_2(hidden))

    handles = []
    if mlp0 is not None:
        handles.append(model.h[0].mlp.register_forward_hook(lambda m, i, o: mlp0))
    if residual1 is not None:
        handles.append(block.attn.register_forward_hook(lambda m, i, o: seen.update(attn=o[0])))
        handles.append(block.register_forward_hook(block1))
    try:
        return model(sentence).last_hidden_state, seen
    finally:
        for handle in handles:
            handle.remove()


def test_edit_gpt2_patch_mlp_from_another_sentence_and_scale_a_residual() -> None:
    model = _gpt2()
    sentence, other = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    cache: dict[str, torch.Tensor] = {}
    handle = model.h[0].mlp.register_forward_hook(lambda m, i, o: cache.update(v=o.detach().clone()))
    with torch.no_grad():
        model(other)
    handle.remove()
    saved = cache["v"].clone()
    edits = {"h.0.mlp": cache["v"], "h.1.add": lambda v: v * 0.5}  # a module output and a functional op (the residual add)
    with torch.no_grad():
        expected, seen = _gpt2_by_hand(model, sentence, cache["v"], lambda v: v * 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxtap.FallbackWarning)
            edited = fxtap.edit(model, edits)
            tapped = fxtap.tap(model, ["h.1.add", "h.0.mlp"], edit=edits)
        torch.testing.assert_close(edited(sentence).last_hidden_state, expected, rtol=1e-6, atol=1e-6)
        taps = tapped(sentence)
    assert edited.mode == "mixed"  # the root runs eagerly; each block is traced on its own, the edits in its graph
    assert edited.paths == {"h.0.mlp": "fx", "h.1.add": "fx"}
    torch.testing.assert_close(taps["h.1.add"], seen["h.1.add"], rtol=1e-6, atol=1e-6)  # the value after the edit
    torch.testing.assert_close(taps["h.0.mlp"], cache["v"], rtol=0, atol=0)
    torch.testing.assert_close(cache["v"], saved, rtol=0, atol=0)  # the patch handed in is not written
    with torch.no_grad():
        by_hooks = fxtap.edit(model, {"h.0.mlp": cache["v"]}, mode="hooks")
        torch.testing.assert_close(by_hooks(sentence).last_hidden_state, _gpt2_by_hand(model, sentence, cache["v"], None)[0], rtol=0, atol=0)
    assert not any(m._forward_hooks for m in model.modules())  # no hook left behind


def test_edit_gpt2_refusals_name_the_nearest_editable_module() -> None:
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        # an op in the root's own forward (it runs eagerly): the modules that forward calls
        with pytest.raises(fxtap.TapNameError, match=r"(?s)cannot edit 'add'.*runs eagerly.*can be edited: 'wte', 'wpe', 'drop', 'h\.0', 'h\.1', 'ln_f'"):
            fxtap.edit(model, {"add": lambda v: v})
        # an op inside GPT2Attention (untraceable, an opaque leaf): the attention module itself
        with pytest.raises(fxtap.TapNameError, match=r"(?s)cannot edit 'h\.0\.attn\.matmul'.*nearest module whose output can be edited is 'h\.0\.attn'"):
            fxtap.edit(model, {"h.0.attn.matmul": lambda v: v})
