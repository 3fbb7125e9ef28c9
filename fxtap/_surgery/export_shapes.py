"""The sizes a cut from a torch.export graph serves, checked at each call (``export_graph``).

The graph holds the sizes torch.export kept static, and symbols for the dynamic ones, each with a
range (sizes 0 and 1 are kept out of a symbol). ``Shapes.check`` refuses a call outside them:
another static size, two sizes of one symbol that differ (the batch of a cut input and of a model
input), a size out of range, another dtype. The graph itself has no such checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch

from .._errors import FxtapError

__all__ = ["Shapes", "bound", "dim"]


@dataclass
class Shapes:
    """What a call's tensors must satisfy: static sizes, symbols equal, symbols in range."""

    dims: list[tuple[str, list[Any]]]  # per input: its key, each dim an int or a sympy expression
    ranges: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    owner: str = ""
    dtypes: list[torch.dtype] = field(default_factory=list)  # per input

    def check(self, values: tuple[Any, ...]) -> None:
        bound: dict[Any, int] = {}
        problems: list[str] = []
        for index, ((key, dims), value) in enumerate(zip(self.dims, values)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"the cut's input {key!r} must be a tensor, not {type(value).__name__}")
            if self.dtypes and value.dtype != self.dtypes[index]:
                problems.append(f"{key!r} is {value.dtype}, the graph holds {self.dtypes[index]}")
            if value.dim() != len(dims):
                problems.append(f"{key!r} has {value.dim()} dimensions, not {len(dims)}")
                continue
            for i, (want, have) in enumerate(zip(dims, value.shape)):
                if isinstance(want, int):
                    if want != have:
                        problems.append(f"{key!r} dim {i} is {have}, the graph holds {want}")
                elif isinstance(want, sympy.Symbol):
                    low, high = self.ranges.get(want, (0, None))
                    if want in bound and bound[want] != have:
                        problems.append(f"{key!r} dim {i} is {have}, but must equal {bound[want]} (the same size in the model)")
                    elif have < low or (high is not None and have > high):
                        why = " (torch.export keeps sizes 0 and 1 out of a dynamic dimension)" if have < 2 <= low + 1 else ""
                        problems.append(f"{key!r} dim {i} is {have}, outside the range {low}..{high or ''} the graph was exported for{why}")
                    bound[want] = have
        for (key, dims), value in zip(self.dims, values):
            for i, want in enumerate(dims):
                if not isinstance(want, (int, sympy.Symbol)) and want.free_symbols <= bound.keys() and int(want.subs(bound)) != value.shape[i]:
                    problems.append(f"{key!r} dim {i} is {value.shape[i]}, the graph needs {want.subs(bound)}")
        if problems:
            raise FxtapError(
                f"this cut of {self.owner} is one torch.export graph, exported at the example's sizes: "
                + "; ".join(problems)
                + ".\n  Build the cut again with an example of these sizes and dtypes (sizes torch.export keeps dynamic may differ)."
            )


def bound(value: Any, default: int | None) -> int | None:
    try:
        return int(value) if sympy.sympify(value).is_finite else default
    except (TypeError, ValueError, AttributeError):
        return default


def dim(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)
