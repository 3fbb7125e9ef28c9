"""The wheel holds every package of fxtap and its ``py.typed`` (a package missing from the
setuptools configuration imports from a checkout, whose folder is on the path, but not after
``pip install fxtap``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_every_package_and_py_typed(tmp_path: Path) -> None:
    source = tmp_path / "src"  # the package as it is in this checkout, without build leftovers
    shutil.copytree(ROOT / "fxtap", source / "fxtap", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
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
