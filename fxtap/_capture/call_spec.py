"""Specialising a call on its non-tensor arguments: the spec a graph is built for."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .._errors import TraceFailedError
from .._values import frozen, holds_tensor
from . import analysis as _plan
from . import fx as _fx

__all__ = [
    "CallSpecs",
    "Spec",
    "adopt_signature",
    "call_spec",
    "default_concrete_args",
    "default_spec",
    "depends_on_arguments",
    "drop_signature",
    "graph_args",
    "graph_kwargs",
]

Spec = tuple[tuple[str, Any], ...]  # (argument name, value) of every non-tensor argument, in signature order


class CallSpecs:
    """The specs of the calls of one model: its signature is read once, at ``tap()``.

    Attributes:
        default: the spec of a call that leaves every default alone.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        signature = _signature(model)
        params = _parameters(signature)
        self._plain = plain(params)
        self.default: Spec = _defaults(params) if self._plain else ()
        # how many tensors a call passes positionally when it leaves every default alone (-1: unknown)
        self._required = sum(1 for p in params if p.default is p.empty and p.kind != p.KEYWORD_ONLY) if self._plain else -1
        self._signature: tuple[Any, inspect.Signature | None] = (_forward_key(model), signature)

    def spec(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, checked: Spec) -> Spec:
        """The spec of this call; ``checked`` (the spec the names were checked with) for the common
        call, tensors for the required arguments, with no signature binding. The signature is
        read again only when the model's ``forward`` was replaced."""
        if not kwargs and checked == self.default and len(args) == self._required and all(isinstance(a, torch.Tensor) for a in args):
            return checked
        key, signature = self._signature
        if key != _forward_key(self._model):
            key, signature = self._signature = (_forward_key(self._model), _signature(self._model))
        return call_spec(self._model, args, kwargs, signature)


def _forward_key(model: nn.Module) -> tuple[Any, Any]:
    """What decides ``model.forward``: the class's and an instance's own (``model.forward = ...``)."""
    return (type(model).forward, model.__dict__.get("forward"))


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _parameters(signature: inspect.Signature | None) -> list[inspect.Parameter]:
    return list(signature.parameters.values()) if signature is not None else []


def depends_on_arguments(analysis: _plan.Analysis) -> bool:
    """Whether tracing with the non-tensor arguments as graph inputs fails where tracing with
    them fixed at their defaults works: then their values decide what the graph holds."""
    if analysis.traced is None:
        return False
    leaves = frozenset(analysis.model.get_submodule(path) for path in analysis.fallbacks if path)
    try:
        _fx.trace(analysis.model, leaves=leaves, concrete_args=None, hints=analysis.hints)
    except TraceFailedError:
        return True
    return False


def parameters(model: nn.Module) -> list[inspect.Parameter]:
    return _parameters(_signature(model))


def plain(params: list[inspect.Parameter]) -> bool:
    return all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


def _defaults(params: list[inspect.Parameter]) -> Spec:
    """The non-tensor arguments at their defaults (unhashable ones ``Frozen``): the spec of a
    call that passes only the required arguments."""
    return tuple((p.name, frozen(p.default)) for p in params if p.default is not p.empty and not holds_tensor(p.default))


def default_spec(model: nn.Module) -> Spec:
    params = parameters(model)
    return _defaults(params) if plain(params) else ()


def default_concrete_args(model: nn.Module) -> dict[str, Any]:
    return dict(default_spec(model))


def call_spec(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], signature: inspect.Signature | None = None) -> Spec:
    """The spec of a call of ``model`` (``signature``: its forward's, when already read)."""
    signature = signature if signature is not None else _signature(model)
    params = _parameters(signature)
    if not plain(params):
        return ()
    bound = signature.bind(*args, **kwargs)  # type: ignore[union-attr]
    spec = []
    for p in params:
        value = bound.arguments.get(p.name, p.default)
        if value is not p.empty and not holds_tensor(value):
            spec.append((p.name, frozen(value)))
    return tuple(spec)


def graph_args(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The call's arguments, positionally in signature order (FX may rename specialised placeholders)."""
    if not kwargs and not _tensor_defaults(model):
        return args  # the common call: no signature to read
    params = parameters(model)
    if not plain(params):
        return args
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return tuple(bound.arguments.get(p.name, p.default) for p in params)


def graph_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keywords that the graph takes as keywords: all of them for a forward with
    ``**kwargs`` (FX keeps that parameter), none otherwise (``graph_args`` passes them)."""
    if not kwargs or plain(parameters(model)):
        return {}
    return kwargs


def _tensor_defaults(model: nn.Module) -> bool:
    """Whether ``forward`` has a default holding a tensor: the graph takes it as an input, since
    FX cannot write a tensor as a default in code (``_tensor_constant0`` would be undefined)."""
    forward = model.forward
    defaults = (getattr(forward, "__defaults__", None) or ()) + tuple((getattr(forward, "__kwdefaults__", None) or {}).values())
    return any(holds_tensor(d) for d in defaults)


def adopt_signature(wrapper: nn.Module, model: nn.Module) -> None:
    """Give ``wrapper`` (whose class's ``forward`` takes ``*args, **kwargs``) the signature of
    ``model.forward``, so that what reads a module's signature reads the model's: torch.export
    matches ``dynamic_shapes`` (a tuple per argument, or a dict by argument name) against it.

    An instance attribute ``forward`` that calls the class's, with ``__signature__`` set; it is
    left out of pickles (``drop_signature``) and made again on load.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    method = type(wrapper).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return method(wrapper, *args, **kwargs)

    forward.__signature__ = signature.replace(return_annotation=inspect.Signature.empty)  # type: ignore[attr-defined]
    forward.__wrapped__ = method  # type: ignore[attr-defined]
    wrapper.__dict__["forward"] = forward


def drop_signature(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a module's ``__dict__`` copy) without the forward ``adopt_signature`` added."""
    state.pop("forward", None)
    return state
