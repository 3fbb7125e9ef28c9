"""Models named on the command line, and the preprocessing each one expects.

A model spec is a torchvision model name (``resnet50``), ``timm:NAME``, or
``package.module:factory`` (a callable taking no arguments). Nothing is ever downloaded:
torchvision and timm models are built with random weights (backbone weights included), and
``weights=`` loads a local state dict with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._capture import names as _names
from .._errors import FxtapError

__all__ = ["IMAGENET", "Loaded", "Preprocess", "load_model", "one_line"]


class Preprocess(NamedTuple):
    """Resize the short side to ``resize``, center-crop ``crop``, scale to [0, 1], normalize."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear", "bicubic" or "nearest"

    def scaled(self, crop: int) -> Preprocess:
        """The same preprocessing for a crop of ``crop`` pixels (the resize keeps its ratio)."""
        return self._replace(resize=round(crop * self.resize / self.crop), crop=crop)

    def __call__(self, image: Any) -> torch.Tensor:
        """A normalized ``(3, crop, crop)`` float tensor from an RGB PIL image.

        The same steps, to the pixel, as torchvision's ``Resize(resize)``, ``CenterCrop(crop)``,
        ``PILToTensor`` and ``Normalize`` on a PIL image (whose resize is PIL's, antialiased).
        """
        from PIL import Image

        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        resize = max(self.resize, self.crop)
        size = (resize, int(resize * long / short))
        image = image.resize(size if width <= height else size[::-1], _RESAMPLING[self.interpolation](Image))
        width, height = image.size
        left, top = round((width - self.crop) / 2.0), round((height - self.crop) / 2.0)  # as torchvision's center_crop
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.crop, self.crop, 3)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (pixels.permute(2, 0, 1).float().div_(255) - mean) / std


_RESAMPLING = {
    "bilinear": lambda pil: pil.Resampling.BILINEAR,
    "bicubic": lambda pil: pil.Resampling.BICUBIC,
    "nearest": lambda pil: pil.Resampling.NEAREST,
}


IMAGENET = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


class Loaded(NamedTuple):
    """A model built from a spec, in eval mode."""

    model: nn.Module
    preprocess: Preprocess
    random_weights: bool


def load_model(spec: str, *, weights: str | Path | None = None) -> Loaded:
    """Build the model named by ``spec``; load ``weights`` (a state dict file) when given.

    Raises:
        FxtapError: the spec names no model, the factory fails, or the weights do not fit.
    """
    if spec.startswith("timm:"):
        model, preprocess = _timm(spec.removeprefix("timm:"))
    elif spec.startswith("hf:"):
        model, preprocess = _huggingface(spec.removeprefix("hf:")), IMAGENET
        return Loaded(model.eval(), preprocess, False) if weights is None else Loaded(_weighted(model, weights, spec), preprocess, False)
    elif ":" in spec:
        model, preprocess = _factory(spec), IMAGENET
    else:
        model, preprocess = _torchvision(spec)
    if weights is not None:
        _load_weights(model, Path(weights), spec)
    return Loaded(model.eval(), preprocess, weights is None)


def _torchvision(name: str) -> tuple[nn.Module, Preprocess]:
    try:
        from torchvision import models  # type: ignore[import-untyped]
    except ImportError as error:
        raise FxtapError(f"model {name!r} is a torchvision name, and torchvision is not installed: pip install torchvision") from error

    available = models.list_models()
    if name not in available:
        close = _names.suggest(name, available)
        hint = f" Did you mean: {', '.join(map(repr, close))}?" if close else ""
        raise FxtapError(f"unknown model {name!r}: not a torchvision model name.{hint} Other models: timm:NAME or package.module:factory.")
    builder = models.get_model_builder(name)
    # weights=None alone still downloads an ImageNet backbone for detection and segmentation models.
    extra = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return builder(weights=None, **extra), _torchvision_preprocess(name)


def _torchvision_preprocess(name: str) -> Preprocess:
    from torchvision import models

    transform = models.get_model_weights(name).DEFAULT.transforms()  # builds a transform, downloads nothing
    crop, resize = getattr(transform, "crop_size", None), getattr(transform, "resize_size", None)
    if not crop or not resize:  # detection, segmentation, video: no classification crop
        return IMAGENET
    return Preprocess(resize[0], crop[0], tuple(transform.mean), tuple(transform.std), transform.interpolation.value)


def _huggingface(path: str) -> nn.Module:
    """A Hugging Face model saved in the local folder ``path`` (``save_pretrained``); never downloads."""
    if not Path(path).is_dir():
        raise FxtapError(f"hf:{path} names no folder: give hf:PATH, a local folder written by save_pretrained (fxtap downloads nothing)")
    try:
        from transformers import AutoModel
    except ImportError as error:
        raise FxtapError(f"hf:{path} needs transformers, which is not installed: pip install transformers") from error
    try:
        return AutoModel.from_pretrained(path, local_files_only=True)  # type: ignore[no-any-return]
    except Exception as error:
        raise FxtapError(f"cannot load hf:{path} with transformers.AutoModel ({type(error).__name__}: {one_line(error, 200)})") from error


def _weighted(model: nn.Module, weights: str | Path, spec: str) -> nn.Module:
    _load_weights(model, Path(weights), spec)
    return model.eval()


def _timm(name: str) -> tuple[nn.Module, Preprocess]:
    try:
        import timm
    except ImportError as error:
        raise FxtapError(f"timm:{name} needs timm, which is not installed: pip install timm") from error
    if not timm.is_model(name):
        close = _names.suggest(name, timm.list_models())
        hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
        raise FxtapError(f"unknown model 'timm:{name}': not a timm model name.{hint}")
    model = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_model_data_config(model)  # type: ignore[attr-defined,no-untyped-call]
    crop = int(config["input_size"][-1])
    resize = int(crop / config.get("crop_pct", 0.875))
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    return model, Preprocess(resize, crop, tuple(config["mean"]), tuple(config["std"]), interpolation)


def _factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    module = _import(module_name, spec)
    try:
        factory = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError as error:
        raise FxtapError(f"{module_name!r} has no {attribute!r} (model {spec!r})") from error
    if callable(factory):
        required = _required_parameters(factory)
        if required:
            raise FxtapError(
                f"{spec!r} needs arguments ({', '.join(required)}): MODEL must be a factory that takes none; "
                f"write one, e.g. def make(): return {attribute}(...), and give {module_name}:make"
            )
        try:
            model = factory()
        except Exception as error:
            raise FxtapError(f"{spec!r} raised {type(error).__name__}: {one_line(error, 200)}") from error
    else:
        model = factory
    if not isinstance(model, nn.Module):
        raise FxtapError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(module_name: str, spec: str) -> Any:
    """Import ``module_name``, from the current folder too (as ``python -m`` and ``python script.py`` do)."""
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after the installed packages: a file here never shadows them
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise FxtapError(
            f"cannot import {module_name!r} for model {spec!r} ({one_line(error, 200)}): run fxtap from the folder that holds it, or add that folder to PYTHONPATH"
        ) from error
    except Exception as error:
        raise FxtapError(f"importing {module_name!r} for model {spec!r} raised {type(error).__name__}: {one_line(error, 200)}") from error


def _required_parameters(factory: Any) -> list[str]:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it and see
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.default is p.empty and p.kind in kinds]


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    if not path.is_file():
        raise FxtapError(f"weights file {str(path)!r} does not exist")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise FxtapError(f"cannot read weights {str(path)!r}: {type(error).__name__}: {one_line(error)}") from error
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError, KeyError, IndexError, TypeError, AttributeError) as error:
        # a text or foreign file: pickle raises KeyError, IndexError, UnpicklingError (whose hint to set weights_only=False is not for us)
        raise FxtapError(
            f"cannot read weights {str(path)!r} ({type(error).__name__}: {one_line(error, 100)}): "
            "--weights takes a state dict saved with torch.save(model.state_dict(), PATH) or a .safetensors file"
        ) from error
    if not isinstance(state, Mapping):
        raise FxtapError(f"weights {str(path)!r} hold a {type(state).__name__}, not a state dict (name -> tensor)")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise FxtapError(f"weights {str(path)!r} do not fit {spec}: {one_line(error)}") from error
    problems = [
        f"{what}: {_few(keys)}" for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys
    ]
    if problems:
        raise FxtapError(f"weights {str(path)!r} do not fit {spec}: {'; '.join(problems)}")


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, shortened to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
