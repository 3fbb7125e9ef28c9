"""A griffe extension for the API reference: read ``Example:`` sections as ``Examples:``.

fxtap's docstrings follow the style guide's ``Example:`` heading; griffe reads only
``Examples:`` as a section of runnable ``>>>`` code, and anything else as a prose admonition.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
