"""Facts about the user's model, read without changing it, and exact restoration of its state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["attribute_paths", "hook_counts", "training_mode", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile``d model (``OptimizedModule._orig_mod``), else ``model``."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def attribute_paths(root: nn.Module) -> tuple[list[str], list[str]]:
    """The module paths, and the parameter and buffer paths, of ``root``."""
    modules = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    others = [n for n, _ in root.named_parameters(remove_duplicate=False)]
    others += [n for n, _ in root.named_buffers(remove_duplicate=False)]
    return modules, others


@contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode for the block; restore every module's own flag after."""
    flags = {module: module.training for module in model.modules()}
    try:
        model.train(train)
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def hook_counts(model: nn.Module) -> dict[str, Any]:
    """How many hooks of each kind each module has (to check that a call left none behind)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        f"{path}:{kind}": len(getattr(module, kind, {}))
        for path, module in model.named_modules()
        for kind in kinds
    }
