"""fxtap: the intermediate activations of any PyTorch model, correct, fast and exportable."""

from ._errors import FallbackWarning as FallbackWarning
from ._errors import FxtapError as FxtapError
from ._errors import MissingCallError as MissingCallError
from ._errors import TapNameError as TapNameError
from ._errors import TraceFailedError as TraceFailedError
from ._tap import Tapped as Tapped
from ._tap import names as names
from ._tap import tap as tap

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "FxtapError",
    "MissingCallError",
    "TapNameError",
    "Tapped",
    "TraceFailedError",
    "names",
    "tap",
]
