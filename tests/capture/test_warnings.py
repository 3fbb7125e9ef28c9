"""Every ``FallbackWarning`` points at the user's line: ``tap``, ``backbone`` and a first call.
``export`` raises instead (naming the untraceable code) and ``compare`` reports fallbacks in its
paths column, so neither warns."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxtap
from support.toy_models import DataDependent


class _Switch(nn.Module):
    """Traceable for the default ``route``; ``route="gate"`` runs untraceable code."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, route: str = "head") -> torch.Tensor:
        return self.inner(x) if route == "gate" else self.head(x)


def _line() -> int:
    """The line number of the caller's next line."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


def _where(caught: list[warnings.WarningMessage]) -> list[tuple[str, int]]:
    return [(w.filename, w.lineno) for w in caught if issubclass(w.category, fxtap.FallbackWarning)]


def test_warning_of_tap_points_at_the_users_line() -> None:
    with pytest.warns(fxtap.FallbackWarning) as caught:
        line = _line()
        fxtap.tap(DataDependent(), ["gate.a"])
    assert _where(caught.list) == [(__file__, line)]


def test_warning_of_backbone_points_at_the_users_line() -> None:
    with pytest.warns(fxtap.FallbackWarning) as caught:
        line = _line()
        fxtap.backbone(DataDependent().eval(), ["post"], torch.randn(2, 4))
    assert _where(caught.list) == [(__file__, line)]


def test_export_raises_instead_of_warning(tmp_path: Path) -> None:
    # export writes one graph: a fallback that keeps a name off it is an error naming the code,
    # and an opaque leaf without requested names runs inside the written graph, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        with pytest.raises(fxtap.FxtapError, match=r"'gate' \(Gate\), which torch.fx cannot trace"):
            fxtap.export(DataDependent().eval(), ["gate.a"], torch.randn(2, 4), tmp_path / "gate.pt")
        fxtap.export(DataDependent().eval(), ["post"], torch.randn(2, 4), tmp_path / "post.pt")
    assert (tmp_path / "post.pt").is_file() and not (tmp_path / "gate.pt").exists()


def test_warning_of_a_first_call_points_at_the_users_line() -> None:
    tapped = fxtap.tap(_Switch(), ["inner.post"])  # exists for route="gate" only: checked per call
    x = torch.randn(2, 4)
    with pytest.warns(fxtap.FallbackWarning) as caught:
        line = _line()
        tapped(x, route="gate")
    assert _where(caught.list) == [(__file__, line)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        out = tapped(x, route="gate")  # warned once per untraceable piece, not per call
    torch.testing.assert_close(out["inner.post"], tapped.model.inner(x), rtol=0, atol=0)


def test_compare_reports_fallbacks_in_its_paths_column_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxtap.FallbackWarning)
        result = fxtap.compare(DataDependent().eval(), ["gate", "post"], torch.randn(2, 4))
    assert (result["gate"].fx, result["post"].fx, result.ok) == (True, True, True)
    assert "runs as one opaque step" not in str(result)
