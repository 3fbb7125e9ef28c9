"""The Hugging Face models of benchmark case 7: every transformers row of the model matrix
(tests/support/registry.py), at a size where a forward costs tens of milliseconds.

Random weights from a config (nothing downloaded), 4 layers of width 256 (width 64 and short
token sequences with ``quick``), 8 sequences of 128 tokens or 8 images of 224 x 224 by default. Each model
taps the output of every layer; a model whose matrix row keeps its output (``keep_output``: a
transformers ``DynamicCache`` in it) keeps it here too, so the graph returns the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Bench:
    """One model: how to build it and its input, and what to tap."""

    name: str  # the matrix row: "BertModel", "GPT2Model+cache", ...
    build: Callable[[int], nn.Module]  # width -> model (eval mode)
    inputs: Callable[[int, int, str], tuple[torch.Tensor, ...]]  # batch, length (tokens) or size (pixels), device
    keep_output: bool = False
    extra: tuple[str, ...] = ()  # names tapped besides every layer


def _hf(model: str, config: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        import transformers

        if model == "WhisperEncoder":
            from transformers.models.whisper.modeling_whisper import (
                WhisperEncoder as cls,
            )
        else:
            cls = getattr(transformers, model)
        sizes = {key.format(width=width): value(width) for key, value in _WIDTH[config].items()}
        torch.manual_seed(0)
        return cls(getattr(transformers, config)(**sizes, **kwargs)).eval()

    return build


# the config keys that set width, depth and heads (4 layers, 4 heads, MLP 4x) per config class
_STD: dict[str, Callable[[int], int]] = {
    "hidden_size": lambda w: w, "num_hidden_layers": lambda w: 4, "num_attention_heads": lambda w: 4, "intermediate_size": lambda w: 4 * w,
}
_WIDTH: dict[str, dict[str, Callable[[int], int]]] = {
    "BertConfig": _STD,
    "ViTConfig": _STD,
    "CLIPVisionConfig": _STD,
    "LlamaConfig": {**_STD, "num_key_value_heads": lambda w: 2},
    "MistralConfig": {**_STD, "num_key_value_heads": lambda w: 2},
    "Qwen2Config": {**_STD, "num_key_value_heads": lambda w: 2},
    "ModernBertConfig": _STD,
    "GPT2Config": {"n_embd": lambda w: w, "n_layer": lambda w: 4, "n_head": lambda w: 4},
    "T5Config": {"d_model": lambda w: w, "d_kv": lambda w: w // 4, "d_ff": lambda w: 4 * w, "num_layers": lambda w: 4, "num_heads": lambda w: 4},
    "WhisperConfig": {"d_model": lambda w: w, "encoder_layers": lambda w: 4, "encoder_attention_heads": lambda w: 4, "encoder_ffn_dim": lambda w: 4 * w},
}


def _tokens(batch: int, length: int, device: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return (torch.randint(0, 1000, (batch, length), device=device),)


def _images(batch: int, length: int, device: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return (torch.randn(batch, 3, 224, 224, device=device),)


def _features(batch: int, length: int, device: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return (torch.randn(batch, 80, 2 * 64, device=device),)  # 80 mel bins, 2 x max_source_positions frames


_VOCAB = {"vocab_size": 1000, "max_position_embeddings": 512}
_DECODER = {**_VOCAB, "use_cache": True}
_GPT2 = {"vocab_size": 1000, "n_positions": 512, "bos_token_id": 0, "eos_token_id": 0}
_IMAGE = {"image_size": 224, "patch_size": 16}

BENCHES = [
    Bench("BertModel", _hf("BertModel", "BertConfig", **_VOCAB), _tokens, extra=("encoder.layer.1.attention.output.add",)),
    Bench("GPT2Model", _hf("GPT2Model", "GPT2Config", **_GPT2), _tokens),
    Bench("ViTModel", _hf("ViTModel", "ViTConfig", **_IMAGE), _images),
    Bench("CLIPVisionModel", _hf("CLIPVisionModel", "CLIPVisionConfig", **_IMAGE), _images),
    Bench("LlamaModel", _hf("LlamaModel", "LlamaConfig", **{**_VOCAB, "use_cache": False}), _tokens),
    Bench("T5EncoderModel", _hf("T5EncoderModel", "T5Config", vocab_size=1000), _tokens),
    Bench(
        "WhisperEncoder",
        _hf("WhisperEncoder", "WhisperConfig", num_mel_bins=80, max_source_positions=64),
        _features,
    ),
    Bench("GPT2Model+cache", _hf("GPT2Model", "GPT2Config", use_cache=True, **_GPT2), _tokens, keep_output=True),
    Bench("LlamaModel+cache", _hf("LlamaModel", "LlamaConfig", **_DECODER), _tokens, keep_output=True),
    Bench("MistralModel", _hf("MistralModel", "MistralConfig", sliding_window=64, **_DECODER), _tokens, keep_output=True),
    Bench(
        "Qwen2Model",
        _hf("Qwen2Model", "Qwen2Config", use_sliding_window=True, sliding_window=64, max_window_layers=2, **_DECODER),
        _tokens,
        keep_output=True,
    ),
    Bench(
        "ModernBertModel",
        _hf(
            "ModernBertModel", "ModernBertConfig", local_attention=64, global_attn_every_n_layers=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **_VOCAB,
        ),
        _tokens,
    ),
]


def layers(model: nn.Module) -> list[str]:
    """The path of every layer: the children of the model's longest ``nn.ModuleList``."""
    lists = [(len(m), path) for path, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    _, path = max(lists)
    return [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]
