"""The same-grammar check: op names given by eager naming (``_capture.eager_ops``) against FX's.

On a model that FX traces, every module's own ops are named twice: by the FX trace, and by
running the model eagerly with every module's ops named as they run (as fxtap does for modules
it cannot trace). Every name both give must mean the same value; eager naming may leave names
out (those it cannot be sure of), never add one that FX does not have.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

import fxtap
from fxtap._capture import analyse, default_concrete_args, describe
from fxtap._capture import eager_ops as _eager_ops
from fxtap._capture.tracer import is_standard_leaf


class Agreement(NamedTuple):
    both: list[str]  # op names both give, in eager order
    differ: list[str]  # names both give whose values differ (a bug)
    eager_only: list[str]  # names eager naming gives and FX does not (a bug)
    fx_only: list[str]  # op names FX gives and eager naming leaves out (allowed)


def scopes(model: nn.Module) -> list[str]:
    """Every module whose own code FX traces through: the root and blocks, not torch.nn's modules
    and not code FX cannot trace (an opaque leaf and everything inside it)."""
    opaque = list(analyse(model, mode="auto", concrete_args=default_concrete_args(model)).fallbacks)
    return [
        path
        for path, module in model.named_modules()
        if (not path or not is_standard_leaf(module)) and not any(path == o or path.startswith(o + ".") for o in opaque)
    ]


def eager_values(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], everywhere: list[str] | None = None) -> dict[str, Any]:
    """Every op name eager naming gives in one call of ``model`` (in ``everywhere``: the scopes), with its value."""
    everywhere = scopes(model) if everywhere is None else everywhere
    names = _eager_ops.list_ops(model, args, kwargs, everywhere)
    values: dict[str, Any] = {}
    ops = _eager_ops.EagerOps({name: "" for name in names})
    torch.default_generator.manual_seed(0)  # dropout in train mode: the same masks as the FX run
    with torch.no_grad(), _eager_ops.naming(model, ops, values.__setitem__, scopes=everywhere):
        model(*args, **kwargs)
    return {name: values[name] for name in names}


def agreement(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Agreement:
    kwargs = kwargs or {}
    eager = eager_values(model, args, kwargs)
    infos = describe(model, train=model.training)
    fx_names = {info.name for info in infos if info.path == "fx"}
    fx_ops = [info.name for info in infos if info.kind == "op" and info.path == "fx"]
    both = [name for name in eager if name in fx_names]
    differ: list[str] = []
    if both:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxtap.FallbackWarning)
            tapped = fxtap.tap(model, both)  # the names are in the graph (fx_names of traced scopes)
        torch.default_generator.manual_seed(0)
        with torch.no_grad():
            traced = tapped(*args, **kwargs)
        differ = [name for name in both if not _same(traced[name], eager[name])]
    eager_only = [name for name in eager if name not in fx_names]
    return Agreement(both, differ, eager_only, [name for name in fx_ops if name not in eager])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)
