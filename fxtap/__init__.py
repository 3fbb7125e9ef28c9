"""fxtap: the intermediate activations of any PyTorch model, correct, fast and exportable."""

from ._compare import Comparison as Comparison
from ._compare import compare as compare
from ._deploy.backbone import FeatureInfo as FeatureInfo
from ._deploy.backbone import backbone as backbone
from ._deploy.export import export as export
from ._edit import Edited as Edited
from ._edit import edit as edit
from ._errors import FallbackWarning as FallbackWarning
from ._errors import FxtapError as FxtapError
from ._errors import MissingCallError as MissingCallError
from ._errors import TapNameError as TapNameError
from ._errors import TraceFailedError as TraceFailedError
from ._features import load_features as load_features
from ._tap import Tapped as Tapped
from ._tap import names as names
from ._tap import tap as tap

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Edited",
    "FallbackWarning",
    "FeatureInfo",
    "FxtapError",
    "MissingCallError",
    "TapNameError",
    "Tapped",
    "TraceFailedError",
    "backbone",
    "compare",
    "edit",
    "export",
    "load_features",
    "names",
    "tap",
]
