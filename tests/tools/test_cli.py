"""The ``fxtap`` command, run as a real subprocess: the console script, a failing ``compare``,
and one error line per wrong input.

The blocks of docs/cli.md and docs/quickstart.md run every command (nodes, tap, compare, export,
extract, torchrun) as a real subprocess too, and check their output (tests/test_docs.py); the
other checks here call ``fxtap.cli.main`` in this process, which is much faster.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxtap
from fxtap.cli import main

from support.cli import IMAGES, console_script, run, run_fxtap


def table_rows(text: str) -> dict[str, list[str]]:
    """A tabulate "simple" table as {first cell: cells}; cells are split on runs of 2+ spaces."""
    lines = [line for line in text.splitlines() if line.strip()]
    dashes = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[dashes + 1 :]]
    return {row[0]: row for row in rows}


_CALLS = [0]


class Counting(torch.nn.Module):
    """Multiplies by how often it was called, counted in a global (Python state outside the model,
    which fxtap cannot see: a count on ``self`` would make it run eagerly): the traced graph keeps
    the count of its one trace."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS[0] += 1
        return self.lin(x) * _CALLS[0]


def test_cli_compare_exits_1_on_a_mismatch() -> None:
    result = run_fxtap("compare", "test_cli:Counting", "lin", "mul", "--input-shape", "2,4")
    assert result.returncode == 1, result.stderr
    rows = table_rows(result.stdout)
    assert rows["lin"][-1] == "ok" and rows["mul"][-1] == "MISMATCH"
    assert result.stdout.splitlines()[-1] == "1 of 2 names agree within rtol=1.3e-06, atol=1e-05"


def test_cli_compare_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "resnet18", "layer1.0.add", "layer2", "--input-shape", "1,3,32,32"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [rows[name][-1] for name in ("layer1.0.add", "layer2")] == ["ok", "ok"]
    assert main(["compare", "test_cli:Counting", "lin", "--input-shape", "2,4", "--atol", "0.5"]) == 0


def test_cli_nodes_lists_every_name_with_kind_shape_and_path() -> None:
    result = run([console_script(), "nodes", "resnet18", "--input-shape", "1,3,32,32", "--grep", "layer1.0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["name", "kind", "module", "type", "shape", "dtype", "path"]
    rows = table_rows(result.stdout)
    expected = [name for name in fxtap.names(torchvision.models.resnet18()) if "layer1.0" in name]
    assert list(rows) == expected
    assert rows["layer1.0.conv1"] == ["layer1.0.conv1", "module", "Conv2d", "(1, 64, 8, 8)", "float32", "fx"]
    assert rows["layer1.0.add"] == ["layer1.0.add", "op", "BasicBlock", "(1, 64, 8, 8)", "float32", "fx"]
    assert rows["layer1.0"] == ["layer1.0", "module", "BasicBlock", "(1, 64, 8, 8)", "float32", "fx"]
    assert "resnet18 has random weights" in result.stderr


def test_cli_tap_prints_statistics_with_loaded_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert main(["tap", "resnet18", "layer1.0.add", "fc", "--weights", str(weights), "--input-shape", "2,3,32,32", "--seed", "3"]) == 0
    result = capsys.readouterr()
    assert "random weights" not in result.err

    torch.manual_seed(3)  # what the command does: seed, build the model, load the weights, draw the input
    model = torchvision.models.resnet18().eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    out = fxtap.tap(model, ["layer1.0.add", "fc"])(torch.randn(2, 3, 32, 32))
    rows = table_rows(result.out)
    assert list(rows) == ["layer1.0.add", "fc"]
    for name, value in out.items():
        value = value.detach().double()
        stats = [value.mean(), value.std(), value.min(), value.max()]
        assert rows[name][1:3] == [str(tuple(value.shape)), "float32"]
        assert [float(cell) for cell in rows[name][3:7]] == pytest.approx([float(s) for s in stats], rel=1e-3, abs=1e-6)
        assert rows[name][7] == "fx"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cli_export_writes_a_file_that_computes_the_taps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "resnet18.pt"
    args = ["export", "resnet18", "layer1.0.add", "layer2", "--format", "torchscript", "-o", str(path), "--input-shape", "1,3,32,32"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {path} (torchscript: layer1.0.add, layer2); its outputs match eager on a random input of shape 1,3,32,32"
    )
    torch.manual_seed(0)  # the command's random weights
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    got = torch.jit.load(str(path))(x)
    want = fxtap.tap(model, ["layer1.0.add", "layer2"])(x)
    assert list(got) == list(want)
    torch.testing.assert_close(dict(got), want)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return {
        "unknown model": (["nodes", "resnet5"], r"unknown model 'resnet5': not a torchvision model name\. Did you mean: .*'resnet50'"),
        "unknown layer": (
            ["tap", "resnet18", "layer5", "--input-shape", "1,3,32,32"],
            r"no tap named 'layer5' in ResNet\. +Did you mean: 'layer4'.* List them with: fxtap nodes resnet18$",
        ),
        "missing data folder": (
            ["extract", "resnet18", "layer2", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")],
            r"data folder '.*nowhere' does not exist$",
        ),
        "unwritable output": (
            ["extract", "resnet18", "layer2", "--data", str(IMAGES), "-o", str(blocker / "out")],
            r"cannot write to output folder '.*a-file/out': Not a directory$",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[] if c == "unknown layer" else [pytest.mark.slow]) for c in ["unknown model", "unknown layer", "missing data folder", "unwritable output"]],
)  # a subprocess each (3 s); the in-process tests check every message by default
def test_cli_wrong_input_is_one_line_on_stderr(case: str, tmp_path: Path) -> None:
    args, pattern = _bad_inputs(tmp_path)[case]
    result = run_fxtap(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fxtap: error: ")
    assert re.search(pattern, lines[0]), lines[0]


# -- in this process ---------------------------------------------------------------------------
def test_cli_main_returns_status_and_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tap", "resnet18", "layer2", "--input-shape", "1,3,32,32", "--mode", "hooks"]) == 0
    captured = capsys.readouterr()
    assert table_rows(captured.out)["layer2"][1:3] == ["(1, 128, 4, 4)", "float32"]
    assert table_rows(captured.out)["layer2"][-1] == "hook"
    assert main(["tap", "resnet18", "layer1.0.add", "--mode", "hooks", "--input-shape", "1,3,32,32"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fxtap: error: no tap named 'layer1.0.add' in ResNet (--mode hooks).") and "\n" not in error  # flags, not Python


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nodes", "resnet18", "--input-shape", "1,3,x"], "expected positive integers separated by commas"),
        (["extract", "resnet18", "layer2", "--data", "d", "-o", "o", "--batch-size", "0"], "expected a positive integer"),
        (["extract", "resnet18", "layer2", "--data", "d", "-o", "o", "--pool", "sum"], "invalid choice: 'sum'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nodes", "resnet18", "--grep", "zzz", "--input-shape", "1,3,32,32"], "no tap name of ResNet contains 'zzz'"),
        (["nodes", "resnet18", "--input-shape", "1,3"], "ResNet failed on a random float32 input of shape 1,3 (RuntimeError: "),
        (["nodes", "fxtap_no_such_module:make"], "cannot import 'fxtap_no_such_module' for model 'fxtap_no_such_module:make'"),
        (["nodes", "torch.nn:NoSuchLayer"], "'torch.nn' has no 'NoSuchLayer' (model 'torch.nn:NoSuchLayer')"),
        (["nodes", "math:pi"], "'math:pi' gave a float, not a torch.nn.Module"),
        (["nodes", "resnet18", "--weights", "/nonexistent/w.pt"], "weights file '/nonexistent/w.pt' does not exist"),
        (["tap", "resnet18", "layer5", "--mode", "fx"], "List them with: fxtap nodes resnet18"),
        (
            ["export", "resnet18", "layer2", "--format", "pt2", "-o", "/nonexistent/r.pt2"],
            "cannot write '/nonexistent/r.pt2': folder '/nonexistent' does not exist",
        ),
    ],
)
def test_cli_wrong_input_messages(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxtap: error: ")
    assert message in err


def test_cli_weights_that_do_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    assert main(["nodes", "resnet18", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"fxtap: error: weights '{weights}' do not fit resnet18: " in err and "size mismatch for fc.weight" in err
    torch.save([1, 2], weights)
    assert main(["nodes", "resnet18", "--weights", str(weights)]) == 2
    assert "hold a list, not a state dict" in capsys.readouterr().err


def test_cli_factory_model_and_safetensors_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    save_file(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.safetensors")
    args = ["tap", "fxtap_cli_models:linear", "linear", "--weights", str(tmp_path / "linear.safetensors"), "--input-shape", "3,4"]
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / "fxtap_cli_models.py").write_text(
            "import torch\n\ndef linear():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n"
        )
        # A state dict of a bare Linear does not fit the Sequential (keys "0.weight"): one clear line.
        assert main(args) == 2
        assert "missing: 0.weight, 0.bias; unexpected: bias, weight" in capsys.readouterr().err
        save_file({f"0.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()}, tmp_path / "linear.safetensors")
        args[2] = "0"
        assert main(args) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fxtap_cli_models", None)
    assert table_rows(capsys.readouterr().out)["0"][1:3] == ["(3, 2)", "float32"]


def test_cli_timm_model(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    assert main(["nodes", "timm:resnet10t", "--grep", "layer1.0.conv1", "--input-shape", "1,3,32,32"]) == 0
    assert table_rows(capsys.readouterr().out)["layer1.0.conv1"][1:3] == ["module", "Conv2d"]
    assert main(["nodes", "timm:resnet5"]) == 2
    assert "unknown model 'timm:resnet5': not a timm model name. Did you mean: timm:resnet" in capsys.readouterr().err


class _Skips(torch.nn.Module):
    """An eager root (a branch on a value) that never calls ``unused``: names() lists it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unused(x) if x.sum() > 1e9 else self.fc(x)


def skips() -> torch.nn.Module:
    return _Skips()


@pytest.mark.filterwarnings("ignore::fxtap.FallbackWarning")  # its root runs eagerly, as intended
def test_cli_nodes_shows_modules_that_do_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "test_cli:skips", "--input-shape", "1,3,8"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["fc"][1:] == ["module", "Linear", "(1, 3, 8)", "float32", "hook"]
    assert rows["unused"][1:] == ["module", "Linear", "(not called)", "hook"]


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fxtap {fxtap.__version__}"
