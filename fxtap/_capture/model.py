"""Facts about the user's model, read without changing it, and exact restoration of its state."""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["ModelPaths", "attribute_paths", "cuda_devices", "hook_counts", "in_mode", "preserved", "stand_in", "training_mode", "unwrap"]


def cuda_devices(values: Iterable[Any]) -> list[int]:
    """The indices of the CUDA devices that the tensors among ``values`` are on: the devices
    whose random number generators ``torch.random.fork_rng`` must save."""
    return sorted({v.device.index or 0 for v in values if isinstance(v, torch.Tensor) and v.is_cuda})


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile``d model (``OptimizedModule._orig_mod``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "_orig_mod", None)
    return model


def stand_in(module: nn.Module, cls: type[nn.Module] | None = None) -> nn.Module:
    """A shallow twin of ``module``: same class (or the subclass ``cls``), same submodules,
    parameters and buffers (the same dict objects), but its own attribute dict. torch.fx stores
    constants it meets while tracing as new attributes of the traced root (``_tensor_constant0``);
    they land on the twin, never on the user's model."""
    twin = object.__new__(cls or type(module))
    twin.__dict__.update(module.__dict__)
    twin.__dict__.pop("forward", None)  # an instance-level forward is not the class's code
    return twin


class ModelPaths(NamedTuple):
    """The attribute paths of a model: names a later module call's ``_k`` suffix must skip."""

    modules: frozenset[str]  # every module path (a module registered twice has both)
    others: frozenset[str]  # parameter and buffer paths

    @classmethod
    def of(cls, root: nn.Module) -> ModelPaths:
        modules, others = attribute_paths(root)
        return cls(frozenset(modules), frozenset(others))

    @property
    def reserved(self) -> frozenset[str]:
        return self.modules | self.others


def attribute_paths(root: nn.Module) -> tuple[list[str], list[str]]:
    """The module paths, and the parameter and buffer paths, of ``root``."""
    modules = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    others = [n for n, _ in root.named_parameters(remove_duplicate=False)]
    others += [n for n, _ in root.named_buffers(remove_duplicate=False)]
    return modules, others


_REGISTRIES = ("_parameters", "_buffers", "_modules")


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Undo attribute writes that running ``forward`` under tracing makes to ``model``'s modules.

    Tracing executes the model's Python code with proxies, and some code caches what it computes
    on ``self`` (torchvision's ``MultiScaleRoIAlign`` stores its scales on first call): those
    proxies must not stay on the user's modules.
    """
    saved = {
        module: (dict(module.__dict__), {r: dict(module.__dict__.get(r) or {}) for r in _REGISTRIES})
        for module in model.modules()
    }
    # containers the code may fill in place (timm levit's ``attention_bias_cache`` dict); the
    # registries are restored above
    contents = {
        id(value): (value, _contents(value))
        for module in saved
        for key, value in module.__dict__.items()
        if type(value) in (dict, list, set) and key not in _REGISTRIES
    }
    try:
        yield
    finally:
        for module, (attributes, registries) in saved.items():
            _restore(module.__dict__, attributes)
            for name, entries in registries.items():
                registry = module.__dict__.get(name)
                if registry is not None:
                    _restore(registry, entries)
        for container, before in contents.values():
            if _changed(_contents(container), before):
                _refill(container, before)


def _restore(current: dict[str, Any], saved: dict[str, Any]) -> None:
    # compare by identity: ``==`` on a leftover proxy would record a graph node, not compare
    if not _same_items(current, saved):
        # what fxtap installs for the span of a call (another thread's tapped call may be
        # running meanwhile) belongs to that call, not to this trace: leave it as it is now
        installed = {k: v for k, v in current.items() if _installed(v)}
        current.clear()
        current.update({k: v for k, v in saved.items() if not _installed(v)})
        current.update(installed)


def _same_items(current: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether ``current`` holds the same keys, in the same order, bound to the same objects."""
    return len(current) == len(saved) and all(map(operator.is_, current, saved)) and all(map(operator.is_, current.values(), saved.values()))


def _installed(value: Any) -> bool:
    return bool(getattr(type(value), "fxtap_installed", False))


def _contents(container: Any) -> tuple[list[Any], list[Any]]:
    """A container's items: keys and values of a dict, the items of a list or set (and no values)."""
    if isinstance(container, dict):
        return list(container), list(container.values())
    return list(container), []


def _changed(now: tuple[list[Any], list[Any]], before: tuple[list[Any], list[Any]]) -> bool:
    return any(len(a) != len(b) or not all(map(operator.is_, a, b)) for a, b in zip(now, before))


def _refill(container: Any, contents: tuple[list[Any], list[Any]]) -> None:
    items, values = contents
    container.clear()
    if isinstance(container, dict):
        container.update(zip(items, values))
    elif isinstance(container, list):
        container.extend(items)
    else:
        container.update(items)


def in_mode(model: nn.Module, train: bool) -> nn.Module:
    """``model`` as ``model.train(train)`` would make it, without changing it (another thread may
    be running it): a twin of its module tree, each module a shallow copy with its own attribute
    dict and child registry, sharing parameters, buffers and hooks; a module found twice in the
    tree is one twin. The twin's own ``train`` runs (a model may override it to keep parts frozen)."""
    twins: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        found = twins.get(id(module))
        if found is not None:
            return found
        copy = object.__new__(type(module))
        copy.__dict__.update(module.__dict__)
        twins[id(module)] = copy
        copy.__dict__["_modules"] = {name: None if child is None else twin(child) for name, child in module._modules.items()}
        return copy

    made = twin(model)
    made.train(train)
    return made


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


def own_forward(module: nn.Module) -> Any:
    """The ``forward`` set on ``module`` itself, not its class's (fxtap's router of a running call,
    ``fxtap_installed``, looked through); ``None`` when there is none. torch.fx traces a root's
    class ``forward`` whatever the object holds."""
    return unrouted(module.__dict__.get("forward"))


def unrouted(forward: Any) -> Any:
    """An instance ``forward`` value, with fxtap's router of a running call looked through."""
    return forward.previous if getattr(forward, "fxtap_installed", False) else forward


@contextmanager
def buffer_values_kept(model: nn.Module) -> Iterator[None]:
    """Put the values of ``model``'s buffers back after the block (a BatchNorm's running
    statistics that a call in train mode updates in place)."""
    import torch

    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                # through ``.data``: the buffer's version counter stays as it was, so an autograd
                # graph that saved it (batch norm saves its running statistics) can still run
                # backward, as after the eager call alone (batch norm's own update does not count)
                if buffer.shape != saved.shape:
                    buffer.data.resize_(saved.shape)
                buffer.data.copy_(saved)


def structural_twin(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A twin of ``module``'s tree that shares every parameter and buffer (the same tensor
    objects) but no dict: its own attribute dict, registries (parameters, buffers, submodules,
    hooks) and containers, each module once (``memo``: a module met twice, a shared one, is
    one twin). torch.export swaps the parameters of the module it traces for fake tensors while
    it runs; on a twin, no other thread calling the user's model ever sees them. A router fxtap
    installs as an instance ``forward`` for a running call is left out."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    twin = object.__new__(type(module))
    memo[id(module)] = twin
    for key, value in module.__dict__.items():
        if key == "_modules":
            value = {name: None if child is None else structural_twin(child, memo) for name, child in value.items()}
        elif isinstance(value, (dict, list, set)):
            value = copy.copy(value)  # an OrderedDict stays one
        elif key == "forward" and getattr(value, "fxtap_installed", False):
            continue
        twin.__dict__[key] = value
    return twin
