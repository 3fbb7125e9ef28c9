"""The one place that formats tables (tabulate is imported here, lazily, and nowhere else)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["table"]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table."""
    from tabulate import tabulate  # type: ignore[import-untyped]

    return str(tabulate(rows, headers=list(headers), tablefmt="simple"))
