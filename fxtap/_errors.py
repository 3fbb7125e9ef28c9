"""The exceptions and warnings fxtap raises: one place, each shown under the public ``fxtap`` name."""

from __future__ import annotations

__all__ = ["CutError", "FallbackWarning", "FxtapError", "MissingCallError", "TapNameError", "TraceFailedError", "summary"]


class FxtapError(Exception):
    """Base class of every error fxtap raises on purpose."""


class TapNameError(FxtapError, KeyError):
    """A requested tap name does not exist in the model (a ``KeyError``).

    ``KeyError.__str__`` shows a repr, which mangles a multi-line message; this class shows the
    message as written.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TraceFailedError(FxtapError, RuntimeError):
    """``torch.fx`` could not trace the model (raised by ``mode="fx"``, which never falls back).

    Attributes:
        module: qualified name of the innermost submodule whose code failed ("" for the root).
        module_type: that submodule's class name.
        reason: first line of the tracing error.
    """

    def __init__(self, message: str, *, module: str = "", module_type: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.module_type = module_type
        self.reason = reason


class MissingCallError(FxtapError, RuntimeError):
    """A requested module call (``blk_2``) did not happen in this forward."""


class CutError(FxtapError, ValueError):
    """``fxtap.cut`` cannot compute the outputs from the given inputs (a ``ValueError``).

    Attributes:
        missing: the tap names of the values the outputs still need (add them to ``inputs``);
            empty when the cut fails for another reason (the message says which).
    """

    def __init__(self, message: str, *, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


class FallbackWarning(UserWarning):
    """fxtap could not trace part of a model and captured some names with forward hooks instead."""


for _cls in (FxtapError, CutError, TapNameError, TraceFailedError, MissingCallError, FallbackWarning):
    _cls.__module__ = "fxtap"


def summary(error: BaseException) -> str:
    """``"TypeError: <first line of the message>"``: an error quoted inside another message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
