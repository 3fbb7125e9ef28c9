"""How many examples an expensive property draws.

The default profile ("ci", 100 examples) keeps the default suite under five minutes on a quiet
two-core machine; the properties that build and trace several models per example draw fewer
there. Any other profile ("thorough": 5,000; "dev": 30) draws its own number everywhere.
"""

from __future__ import annotations

from hypothesis import settings

_CI = 100  # max_examples of the "ci" profile (tests/conftest.py)


def examples(in_ci: int) -> int:
    """``in_ci`` under the "ci" profile, else the loaded profile's ``max_examples``."""
    loaded = settings.default.max_examples
    return in_ci if loaded == _CI else loaded
