"""Every script in examples/ runs on its own (a real subprocess) and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# The shapes the article's recipe prints (its models and inputs, batch size 1).
SEED_SHAPES = {
    "seed_example1.py": {"conv1": "torch.Size([1, 16, 32, 32])"},
    "seed_example2.py": {"layer1": "torch.Size([1, 64])", "layer3": "torch.Size([1, 128])"},
    "seed_example3.py": {"conv1": "torch.Size([1, 16, 32, 32])", "fc1": "torch.Size([1, 10])"},
}

_SHAPE_LINE = re.compile(r"^(fxtap|hook recipe)\s+(\S+): (torch\.Size\(\[[0-9, ]*\]\))$", re.MULTILINE)
_AGREE_LINE = re.compile(r"^(\S+) values agree: (True|False)$", re.MULTILINE)


def run_example(script: Path) -> str:
    """Run ``script`` with this interpreter from the repository root; return its stdout, failing on a non-zero exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{script.name} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def check_seed_output(stdout: str, expected: dict[str, str]) -> None:
    """fxtap and the hook recipe print the article's shapes, and their values agree exactly."""
    shapes: dict[str, dict[str, str]] = {"fxtap": {}, "hook recipe": {}}
    for source, key, shape in _SHAPE_LINE.findall(stdout):
        shapes[source][key] = shape
    assert {k: shapes["fxtap"][k] for k in expected if k in shapes["fxtap"]} == expected, stdout
    assert shapes["hook recipe"] == expected, stdout
    assert dict(_AGREE_LINE.findall(stdout)) == {key: "True" for key in expected}, stdout


def test_examples_all_listed() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(["resnet18_features.py", "fpn_backbone.py", "cut_head.py", *SEED_SHAPES])


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_short_and_self_contained(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    assert len(text.splitlines()) < 60
    assert "torch.manual_seed(" in text
    assert "pretrained" not in text
    assert set(re.findall(r"weights=(\w+)", text)) <= {"None"}  # random weights, no download


def test_examples_resnet18_features_prints_table() -> None:
    stdout = run_example(EXAMPLES / "resnet18_features.py")
    rows = {
        "bn1": ("stem", "(2, 64, 112, 112)"),
        "layer1.0.add": ("residual", "(2, 64, 56, 56)"),
        "layer2": ("c3", "(2, 128, 28, 28)"),
        "layer4.1.relu_1": ("c5", "(2, 512, 7, 7)"),
    }
    lines = stdout.splitlines()
    assert lines[0].split() == ["name", "key", "shape", "path"]
    for name, (key, shape) in rows.items():
        assert re.search(rf"^{re.escape(name)}\s+{key}\s+{re.escape(shape)}\s+fx$", stdout, re.MULTILINE), stdout
    assert "mode: fx" in lines
    assert "bn1 has negatives: True" in lines
    assert "layer1.0.add has negatives: True" in lines


@pytest.mark.slow  # 9 s; a cut trains by default in tests/surgery/test_cut_edit.py
def test_examples_cut_head_trains_like_the_frozen_model() -> None:
    stdout = run_example(EXAMPLES / "cut_head.py")
    steps = re.findall(r"^step (\d): cut loss (\S+), full loss (\S+), losses equal: (\w+), layer4 and fc gradients equal: (\w+)$", stdout, re.MULTILINE)
    assert [s[0] for s in steps] == ["0", "1", "2"], stdout
    assert all(cut == full and equal == grads == "True" for _, cut, full, equal, grads in steps), stdout
    assert float(steps[-1][1]) < float(steps[0][1])  # it trains


@pytest.mark.parametrize("script", [pytest.param(s, marks=[] if i == 0 else [pytest.mark.slow]) for i, s in enumerate(sorted(SEED_SHAPES))])  # 3 s each
def test_examples_seed_matches_hook_recipe(script: str) -> None:
    check_seed_output(run_example(EXAMPLES / script), SEED_SHAPES[script])


@pytest.mark.parametrize(
    "stdout",
    [
        "fxtap       conv1: torch.Size([1, 16, 32, 32])\nhook recipe conv1: torch.Size([1, 16, 32, 32])\nconv1 values agree: False\n",
        "fxtap       conv1: torch.Size([1, 16, 32, 32])\nhook recipe conv1: torch.Size([1, 16, 16, 16])\nconv1 values agree: True\n",
        "fxtap       conv1: torch.Size([1, 16, 32, 32])\nconv1 values agree: True\n",
        "",
    ],
)
def test_examples_seed_check_can_fail(stdout: str) -> None:
    with pytest.raises(AssertionError):
        check_seed_output(stdout, SEED_SHAPES["seed_example1.py"])


def test_examples_run_example_fails_on_error(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(AssertionError, match="exited with 3"):
        run_example(script)
