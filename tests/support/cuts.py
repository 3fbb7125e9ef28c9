"""The check run by the cut tests: a cut's outputs equal the full model's, exactly.

``check`` cuts a model at one tap name, adds the values that ``fxtap.cut`` reports missing (as a
user would) until the cut builds, then feeds it the values ``fxtap.tap`` returns for those names
and compares each output with the full model's (``fxtap.tap(..., keep_output=True)`` on the same
input, eval mode, no grad): equal exactly, and the tapped values are not changed by the cut.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

import fxtap

from .matrix import assert_close


def build(model: nn.Module, point: str, outputs: list[str], example: Any = None, rounds: int = 8) -> tuple[fxtap.Cut, list[str]] | None:
    """``fxtap.cut(model, [point, ...], outputs)`` with every value it reports missing added;
    ``None`` when the cut is refused for another reason (an in-place write it cannot reproduce)."""
    inputs = [point]
    for _ in range(rounds):
        try:
            return fxtap.cut(model, inputs, outputs, example=example), inputs
        except fxtap.CutError as error:
            if not error.missing:
                assert "writes into it in place" in str(error), error
                return None
            again = [name for name in error.missing if name in inputs]
            assert not again, f"{again} reported missing though given as inputs"
            inputs = inputs + error.missing
    raise AssertionError(f"still missing values after {rounds} rounds: {inputs}")


def tensor_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]) -> set[str]:
    """Those of ``names`` whose value is one tensor (a cut input must be: not an int read from a shape, nor a tuple)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        out = fxtap.tap(model, names)(*args, **kwargs)
    return {name for name, value in out.items() if isinstance(value, torch.Tensor)}


def check(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], point: str, outputs: list[str], *, example: bool = True) -> list[str] | None:
    """Cut at ``point`` (plus what is missing); its outputs equal the model's. Returns the inputs
    used, or ``None`` when the cut is refused (``build``)."""
    built = build(model, point, outputs, example=args if example else None)
    if built is None:
        return None
    cut, inputs = built
    wanted = list(dict.fromkeys([*inputs, *[o for o in outputs if o != "output"]]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        full = fxtap.tap(model, wanted, keep_output=True)(*args, **kwargs)
        given = {name: full[name].clone() if isinstance(full[name], torch.Tensor) else full[name] for name in inputs}
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        extra = [bound.arguments[name] for name in cut.inputs[len(inputs):]]
        out = cut(*[given[name] for name in inputs], *extra)
    assert list(out) == outputs
    for name in outputs:
        assert_close(out[name], full[name], where=f"cut at {inputs} -> {name!r}")
    for name in inputs:
        assert_close(given[name], full[name], where=f"the cut's input {name!r} after the call")
    return inputs
