"""Running the ``fxtap`` command as a real subprocess, from this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def fxtap_env() -> dict[str, str]:
    """The environment of a subprocess: this checkout and tests/ importable, no torchrun variables."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "tools"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each rank: the same arithmetic in every run
    return env


def run(command: list[str], *, timeout: float = 180) -> Result:
    proc = subprocess.run(command, cwd=ROOT, env=fxtap_env(), capture_output=True, text=True, check=False, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_fxtap(*args: str | Path) -> Result:
    """``python -m fxtap ARGS`` with this interpreter."""
    return run([sys.executable, "-m", "fxtap", *map(str, args)])


def console_script() -> str:
    script = Path(sys.executable).with_name("fxtap")
    if not script.exists():
        pytest.fail(f"the fxtap console script is not installed next to {sys.executable}: pip install -e .")
    return str(script)
