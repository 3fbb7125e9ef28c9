"""The benchmark script runs end to end (a smoke run: it asserts no timing, only that every case reports)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_script_quick_run_reports_every_case() -> None:
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-write"],
        capture_output=True, text=True, timeout=1200, check=True,
    )
    for case in ["1. resnet50 4 stages", "2. vit_b_16 early tap", "3. build swin_t", "4. build time", "5. memory resnet50", "6. guard", "7. GPT2Model", "8. eager op names"]:
        assert case in result.stdout, case
