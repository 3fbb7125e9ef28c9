"""Hugging Face attention masks in fxtap's exports: the shortcut eager code takes, where it
reads no tensor's values.

transformers' ``masking_utils`` skips building an attention mask when none is needed: no padding
mask was given and the query and key lengths allow SDPA's own ``is_causal`` (or no mask at all
for an encoder), which lets SDPA use its fast kernels. Under ``torch.export`` it never skips
(``is_torchdynamo_exporting()``), because an exported program given out could not check its
sizes again; so the exported graph builds an all-ones mask from the inputs' sizes and passes it
to every attention call. fxtap's exported graphs do check their sizes on every call
(``export._Shapes``, torch.export's own guard function), so while fxtap exports, in the exporting
thread only, ``masking_utils`` sees itself not exporting: it decides as under ``torch.compile``.
A padding mask that was given is still never read (``is_tracing`` of it is true), so the graph
holds what eager code computes when its decision does not depend on values, and the mask
otherwise, as before. Values are the same either way; the graph is faster (benchmarks/run.py
case 7).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["eager_shortcuts"]


@contextmanager
def eager_shortcuts() -> Iterator[None]:
    """While fxtap exports (in this thread), transformers' mask helpers decide as eager code does
    where that reads no values; nothing changes where transformers is not imported or has no
    such helper."""
    module = sys.modules.get("transformers.masking_utils")
    original = getattr(module, _NAME, None)
    if module is None or not callable(original):
        yield
        return
    thread = threading.get_ident()

    def exporting() -> bool:
        return False if threading.get_ident() == thread else bool(original())

    setattr(module, _NAME, exporting)
    try:
        yield
    finally:
        if getattr(module, _NAME, None) is exporting:  # unless someone replaced it meanwhile
            setattr(module, _NAME, original)


_NAME = "is_torchdynamo_exporting"
