"""fxtap: the intermediate activations of any PyTorch model, correct, fast and exportable.

This module holds the public names only. For maintainers, the layers (imports point down only):
``fxtap.cli`` -> this package -> ``_compare``, ``_deploy`` (backbone, export, verify),
``_features`` (the on-disk format) -> ``_tap`` (tap, names, Tapped: the only place that warns)
-> ``_capture`` (the engine: trace, place each name on a graph or a hook, run) -> ``_errors``,
``_values``, ``_text``. docs/architecture.md is the map: the engine's contract, how a call flows,
and where to add a capture strategy.
"""

from ._compare import Comparison as Comparison
from ._compare import compare as compare
from ._deploy.backbone import FeatureInfo as FeatureInfo
from ._deploy.backbone import backbone as backbone
from ._deploy.export import export as export
from ._edit import Edited as Edited
from ._edit import edit as edit
from ._errors import CutError as CutError
from ._errors import FallbackWarning as FallbackWarning
from ._errors import FxtapError as FxtapError
from ._errors import MissingCallError as MissingCallError
from ._errors import TapNameError as TapNameError
from ._errors import TraceFailedError as TraceFailedError
from ._extract import extract as extract
from ._features import load_features as load_features
from ._surgery.cut import Cut as Cut
from ._surgery.cut import cut as cut
from ._tap import Tapped as Tapped
from ._tap import names as names
from ._tap import tap as tap

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Cut",
    "CutError",
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
    "cut",
    "edit",
    "export",
    "extract",
    "load_features",
    "names",
    "tap",
]
