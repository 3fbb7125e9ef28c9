"""The real-model matrix: every model of issue 8, with random weights and the smallest input it allows.

One entry per model: how to build it (seeded, eval mode, nothing downloaded), how to make its
inputs, the tolerance its values are compared with, whether it belongs to the fast default run,
and what ``Tapped.mode`` is expected to be (checked, so that a change in fallback shows up).
``tests/models/test_matrix.py`` runs every entry; ``docs/gen_models.py`` measures every entry
and writes docs/models.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    """One model of the matrix."""

    name: str  # "torchvision/resnet18", "timm/resnet18", "transformers/BertModel"
    build: Callable[[], nn.Module]
    inputs: Callable[[], Inputs]
    mode: str  # the expected Tapped.mode after two calls: "fx", "export", "mixed" or "hooks"
    slow: bool = False  # not in the default run (--runslow runs it)
    atol: float = 0.0  # 0: values must be equal exactly
    extra: tuple[str, ...] = ()  # names tapped besides the automatic pick: ones that exposed an fxtap bug
    xfail: str = ""  # a known failure, run as a strict xfail: "fxtap bug: ..." or why it cannot be supported
    raises: type[BaseException] | None = None  # the exception the xfail must raise (None: any)
    note: str = ""  # what docs/models.md says about the input or the configuration
    keep_output: bool = False  # tap with keep_output=True: the model's own output (a transformers cache in it) is checked too

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def short(self) -> str:
        return self.name.split("/", 1)[1]


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    @functools.wraps(factory)
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().eval()

    return build


def _image(size: int | tuple[int, int], batch: int = 1, channels: int = 3) -> Callable[[], Inputs]:
    h, w = (size, size) if isinstance(size, int) else size

    def make() -> Inputs:
        torch.manual_seed(1)
        return (torch.randn(batch, channels, h, w),), {}

    return make


def _video(frames: int, size: int) -> Callable[[], Inputs]:
    def make() -> Inputs:
        torch.manual_seed(1)
        return (torch.randn(1, 3, frames, size, size),), {}

    return make


def _image_list(size: int) -> Callable[[], Inputs]:
    def make() -> Inputs:
        torch.manual_seed(1)
        return ([torch.rand(3, size, size)],), {}

    return make


def _two_images(size: int, **kwargs: Any) -> Callable[[], Inputs]:
    def make() -> Inputs:
        torch.manual_seed(1)
        return (torch.rand(1, 3, size, size), torch.rand(1, 3, size, size)), dict(kwargs)

    return make


def _tokens(batch: int = 2, length: int = 8, vocab: int = 100) -> Callable[[], Inputs]:
    def make() -> Inputs:
        torch.manual_seed(1)
        return (torch.randint(0, vocab, (batch, length)),), {}

    return make


# -- torchvision ---------------------------------------------------------------------------------------
def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return _seeded(factory)


_DETECTION = {"weights_backbone": None, "min_size": 128, "max_size": 128}
_FEW_BOXES = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 10}

TORCHVISION = [
    Case("torchvision/resnet18", _tv("resnet18"), _image(64), "fx"),
    Case("torchvision/resnet50", _tv("resnet50"), _image(64), "fx", slow=True),
    Case("torchvision/wide_resnet50_2", _tv("wide_resnet50_2"), _image(64), "fx", slow=True),
    Case("torchvision/resnext50_32x4d", _tv("resnext50_32x4d"), _image(64), "fx", slow=True),
    Case("torchvision/mobilenet_v2", _tv("mobilenet_v2"), _image(64), "fx", slow=True),
    Case("torchvision/mobilenet_v3_small", _tv("mobilenet_v3_small"), _image(64), "fx"),
    Case(
        "torchvision/efficientnet_b0", _tv("efficientnet_b0"), _image(64), "fx",
        extra=("features.2.1.block.3", "features.2.1.add"),  # the value before `result += input` (stochastic_depth alias)
    ),
    Case(
        "torchvision/efficientnet_v2_s", _tv("efficientnet_v2_s"), _image(64), "fx", slow=True,
        extra=("features.1.0.block.0", "features.1.0.add"),  # the value before `result += input` (stochastic_depth alias)
    ),
    Case("torchvision/regnet_y_400mf", _tv("regnet_y_400mf"), _image(64), "fx", slow=True),
    Case(
        "torchvision/convnext_tiny", _tv("convnext_tiny"), _image(64), "fx", slow=True,
        extra=("features.1.0.mul", "features.1.0.add"),  # the value before `result += input` (stochastic_depth alias)
    ),
    Case("torchvision/densenet121", _tv("densenet121"), _image(64), "fx", slow=True),
    Case("torchvision/googlenet", _tv("googlenet", aux_logits=False, init_weights=True), _image(64), "fx", slow=True, note="aux_logits=False"),
    Case("torchvision/inception_v3", _tv("inception_v3", aux_logits=False, init_weights=True), _image(80), "fx", slow=True, note="aux_logits=False"),
    Case("torchvision/squeezenet1_0", _tv("squeezenet1_0"), _image(64), "fx", slow=True),
    Case("torchvision/shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), _image(64), "fx", slow=True),
    Case("torchvision/mnasnet0_5", _tv("mnasnet0_5"), _image(64), "fx", slow=True),
    Case("torchvision/vgg11_bn", _tv("vgg11_bn"), _image(32), "fx", slow=True),
    Case("torchvision/alexnet", _tv("alexnet"), _image(64), "fx", slow=True),
    Case("torchvision/vit_b_16", _tv("vit_b_16", image_size=32), _image(32), "fx", slow=True, note="image_size=32"),
    Case("torchvision/swin_t", _tv("swin_t"), _image(64), "fx"),
    Case("torchvision/swin_v2_t", _tv("swin_v2_t"), _image(64), "fx", slow=True),
    Case("torchvision/maxvit_t", _tv("maxvit_t"), _image(224), "fx", slow=True),
    Case("torchvision/r3d_18", _tv("r3d_18"), _video(4, 32), "fx"),
    Case("torchvision/s3d", _tv("s3d"), _video(16, 224), "fx", slow=True, note="16 frames of 224 x 224: its final pooling needs them"),
    Case("torchvision/mvit_v2_s", _tv("mvit_v2_s"), _video(16, 224), "fx", slow=True, note="its fixed input size, 16 frames of 224 x 224"),
    Case("torchvision/deeplabv3_mobilenet_v3_large", _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None), _image(64), "fx", slow=True),
    Case("torchvision/fcn_resnet50", _tv("fcn_resnet50", weights_backbone=None), _image(64), "fx", slow=True),
    Case("torchvision/lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", weights_backbone=None), _image(64), "fx"),
    Case("torchvision/fasterrcnn_mobilenet_v3_large_fpn", _tv("fasterrcnn_mobilenet_v3_large_fpn", **_DETECTION), _image_list(128), "mixed", note="min_size=max_size=128"),
    Case("torchvision/maskrcnn_resnet50_fpn", _tv("maskrcnn_resnet50_fpn", **_DETECTION, **_FEW_BOXES), _image_list(128), "mixed", slow=True, note="min_size=max_size=128, 100 proposals, 10 detections"),
    Case(
        "torchvision/retinanet_resnet50_fpn", _tv("retinanet_resnet50_fpn", **_DETECTION), _image_list(128), "mixed", slow=True,
        note="min_size=max_size=128",
    ),
    Case(
        "torchvision/ssdlite320_mobilenet_v3_large", _tv("ssdlite320_mobilenet_v3_large", weights_backbone=None), _image_list(128), "mixed",
        slow=True, note="resized to 320 by the model", extra=("head.regression_head", "head.regression_head.module_list.0.0"),  # hooks inside a list-argument head
    ),
    Case("torchvision/keypointrcnn_resnet50_fpn", _tv("keypointrcnn_resnet50_fpn", **_DETECTION, **_FEW_BOXES), _image_list(128), "mixed", slow=True, note="min_size=max_size=128, 100 proposals, 10 detections"),
    Case("torchvision/raft_small", _tv("raft_small"), _two_images(128, num_flow_updates=3), "mixed", slow=True, note="num_flow_updates=3"),
]


# -- timm ------------------------------------------------------------------------------------------------
def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return _seeded(factory)


TIMM = [
    Case("timm/resnet18", _timm("resnet18"), _image(64), "fx", slow=True),
    Case("timm/efficientnet_b0", _timm("efficientnet_b0"), _image(64), "fx", slow=True),
    Case("timm/vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), _image(32), "fx", note="img_size=32"),
    Case("timm/deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", img_size=32), _image(32), "fx", slow=True, note="img_size=32"),
    Case("timm/swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224", img_size=112), _image(112), "fx", slow=True, note="img_size=112"),
    Case("timm/convnext_atto", _timm("convnext_atto"), _image(64), "fx", slow=True),
    Case("timm/mobilevitv2_050", _timm("mobilevitv2_050"), _image(64), "fx"),
    Case("timm/levit_128s", _timm("levit_128s", img_size=64), _image(64), "fx", slow=True, note="img_size=64"),
    Case("timm/regnetx_002", _timm("regnetx_002"), _image(64), "fx", slow=True),
    Case("timm/fastvit_t8", _timm("fastvit_t8"), _image(64), "fx", slow=True),
    Case("timm/eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", img_size=56), _image(56), "fx", note="img_size=56"),
    Case("timm/coat_lite_tiny", _timm("coat_lite_tiny", img_size=64), _image(64), "fx", slow=True, note="img_size=64"),
    Case("timm/nfnet_l0", _timm("nfnet_l0"), _image(64), "fx", slow=True),
]


# -- Hugging Face transformers, from tiny configs ----------------------------------------------------
def _hf(model: str, config: str, **config_kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import transformers

        if model == "WhisperEncoder":
            from transformers.models.whisper.modeling_whisper import (
                WhisperEncoder as cls,
            )
        else:
            cls = getattr(transformers, model)
        return cls(getattr(transformers, config)(**config_kwargs))

    return _seeded(factory)


_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_DECODER = {"vocab_size": 100, "num_key_value_heads": 1, "max_position_embeddings": 64, **_TINY}
_GPT2 = {"vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}


def _whisper_features() -> Inputs:
    torch.manual_seed(1)
    return (torch.randn(1, 16, 32),), {}


TRANSFORMERS = [
    Case("transformers/BertModel", _hf("BertModel", "BertConfig", vocab_size=100, max_position_embeddings=64, **_TINY), _tokens(), "export"),
    Case(
        "transformers/GPT2Model",
        _hf("GPT2Model", "GPT2Config", **_GPT2),
        _tokens(),
        "export",
    ),
    Case("transformers/ViTModel", _hf("ViTModel", "ViTConfig", image_size=32, patch_size=8, **_TINY), _image(32), "export", slow=True),
    Case("transformers/CLIPVisionModel", _hf("CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=8, **_TINY), _image(32), "export", slow=True),
    Case(
        "transformers/LlamaModel",
        _hf("LlamaModel", "LlamaConfig", use_cache=False, **_DECODER),
        _tokens(),
        "export",
    ),
    Case(
        "transformers/T5EncoderModel",
        _hf("T5EncoderModel", "T5Config", vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),
        _tokens(),
        "export",
        slow=True,
    ),
    Case(
        "transformers/WhisperEncoder",
        _hf(
            "WhisperEncoder",
            "WhisperConfig",
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
        ),
        _whisper_features,
        "export",
        slow=True,
        note="16 mel bins, 32 frames",
    ),
]

# issue 17: decoders that return their key/value cache (a DynamicCache in the output, checked
# with keep_output=True against eager, layer by layer), and newer architectures
TRANSFORMERS_17 = [
    Case(
        "transformers/GPT2Model+cache", _hf("GPT2Model", "GPT2Config", use_cache=True, **_GPT2), _tokens(), "export", slow=True,
        keep_output=True, note="use_cache=True, keep_output=True: the DynamicCache it returns is checked",
    ),
    Case(
        "transformers/LlamaModel+cache", _hf("LlamaModel", "LlamaConfig", use_cache=True, **_DECODER), _tokens(), "export", slow=True,
        keep_output=True, note="use_cache=True, keep_output=True: the DynamicCache it returns is checked",
    ),
    Case(
        "transformers/MistralModel", _hf("MistralModel", "MistralConfig", sliding_window=4, **_DECODER), _tokens(), "export", slow=True,
        keep_output=True, note="sliding_window=4, grouped-query attention; its DynamicCache (sliding-window layers) is checked",
    ),
    Case(
        "transformers/Qwen2Model",
        _hf("Qwen2Model", "Qwen2Config", use_sliding_window=True, sliding_window=4, max_window_layers=1, **_DECODER),
        _tokens(), "export", slow=True, keep_output=True,
        note="one full and one sliding-window layer (window 4); its DynamicCache is checked",
    ),
    Case(
        "transformers/ModernBertModel",
        _hf(
            "ModernBertModel", "ModernBertConfig", vocab_size=100, max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            **{**_TINY, "num_hidden_layers": 3},
        ),
        _tokens(), "export", slow=True, note="3 layers, global and local (window 4) attention",
    ),
]

CASES: dict[str, Case] = {case.name: case for case in [*TORCHVISION, *TIMM, *TRANSFORMERS, *TRANSFORMERS_17]}
