"""The tap-name grammar, pinned by a golden list, and its pure-string helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtap
from fxtap._capture import names as _names


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        self.relu = nn.ReLU()
        self.block = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(x)
        x = F.relu(x)  # named like the module `relu`: relu_fn
        x = torch.flatten(x.mean((2, 3)), 1)
        y = self.block(x)
        y += x
        return self.relu(self.block(y))


GOLDEN = [
    "x", "stem.0", "stem.1", "stem", "relu", "relu_fn", "mean", "flatten", "block", "add", "block_1", "relu_1",
]  # fmt: skip


def test_names_golden_list() -> None:
    assert fxtap.names(Golden()) == GOLDEN


def test_hooks_name_module_calls_like_fx() -> None:
    hookable = [n for n in GOLDEN if n not in {"x", "relu_fn", "mean", "flatten", "add"}]
    out = fxtap.tap(Golden(), hookable, mode="hooks")(torch.randn(1, 3, 5, 5))
    assert list(out) == hookable


def test_namer_skips_reserved_suffixes() -> None:
    namer = _names.Namer(["ln", "ln_1"])
    assert [namer.module_call("ln", i) for i in range(3)] == ["ln", "ln_2", "ln_3"]
    assert namer.node("ln") == "ln_fn"
    assert namer.node("add") == "add" and namer.node("add") == "add_1"


def test_module_call_name_is_pure() -> None:
    assert _names.module_call_name("blk", 0, frozenset()) == "blk"
    assert _names.module_call_name("blk", 2, frozenset({"blk_1"})) == "blk_3"


@pytest.mark.parametrize(("raw", "base"), [("iadd", "add"), ("add_", "add_"), ("__getitem__", "getitem"), ("flatten", "flatten"), ("imag", "imag")])
def test_op_base_name(raw: str, base: str) -> None:
    assert _names.op_base_name(raw) == base


def test_suggest_prefers_structural_matches() -> None:
    available = ["layer2.0.relu", "layer2.1.relu", "layer2.0.relu_1", "layer3.0.relu", "fc"]
    assert _names.suggest("layer2.relu", available)[:2] == ["layer2.0.relu", "layer2.1.relu"]


def test_tap_name_error_str_is_readable() -> None:
    error = fxtap.TapNameError("line one\n  line two")
    assert str(error) == "line one\n  line two"
    assert isinstance(error, KeyError)


def test_public_api() -> None:
    assert sorted(fxtap.__all__) == sorted(
        ["FallbackWarning", "FxtapError", "MissingCallError", "TapNameError", "Tapped", "TraceFailedError", "names", "tap"]
        + ["extract", "load_features"]
        + ["FeatureInfo", "backbone", "export"]
        + ["Comparison", "compare"]
        + ["Cut", "CutError", "cut"]
        + ["Edited", "edit"]
    )
    for name in fxtap.__all__:
        assert getattr(fxtap, name).__module__ in ("fxtap", "fxtap._tap", "fxtap._extract", "fxtap._features", "fxtap._deploy.backbone", "fxtap._deploy.export", "fxtap._compare", "fxtap._surgery.cut", "fxtap._edit")


def test_import_does_not_import_tabulate_or_dynamo() -> None:
    # torch._dynamo is a second of every CLI command's start: imported by torch.compile and
    # torch.export when used (Tapped builds eagerly under torch.compile all the same: _tap._eagerly)
    import subprocess
    import sys

    code = "import sys, fxtap; print('tabulate' in sys.modules, 'torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False False"
