"""The wheel holds every package of fxtap and its ``py.typed`` (a package missing from the
setuptools configuration imports from a checkout, whose folder is on the path, but not after
``pip install fxtap``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("git") is None, reason="copies the tracked files with git")
def test_wheel_holds_every_package_and_py_typed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(source)], check=True)  # no build files in the checkout
    tracked = subprocess.run(["git", "ls-files", "fxtap"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for path in tracked:  # the working tree's files, committed or not
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    shutil.copy2(ROOT / "pyproject.toml", source / "pyproject.toml")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(tmp_path / "wheel")],
        cwd=source, capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("fxtap-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "fxtap").rglob("__init__.py"))
    assert len(packages) >= 5
    assert [p for p in packages if f"{p}/__init__.py" not in inside] == []
    modules = [str(p.relative_to(ROOT)) for p in (ROOT / "fxtap").rglob("*.py")]
    assert [m for m in modules if m not in inside] == []
    assert "fxtap/py.typed" in inside
