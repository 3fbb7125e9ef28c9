"""The benchmark script runs end to end (a smoke run: it asserts no timing, only that every case reports)."""

import json
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


def test_cuda_check_dry_run_on_the_cpu_reports_every_check(tmp_path: Path) -> None:
    """benchmarks/cuda_check.py (run once on a GPU machine) runs here on the CPU: no FAIL, a JSON summary."""
    out = tmp_path / "cuda_check.json"
    only = ["rng_fx", "buffers_batchnorm", "moved_to_cuda"]
    command = [sys.executable, str(ROOT / "benchmarks" / "cuda_check.py"), "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command + [arg for name in only for arg in ("--only", name)], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.split(" ")[0] in ("OK", "FAIL", "SKIP")]
    assert [line.split(" ")[1] for line in lines] == only, result.stdout
    assert all(line.startswith(("OK ", "SKIP ")) for line in lines), result.stdout
    assert lines[-1].startswith("SKIP moved_to_cuda"), lines[-1]  # needs a CUDA device
    summary = json.loads(out.read_text())
    assert [check["status"] for check in summary["checks"]] == ["OK", "OK", "SKIP"] and summary["device"] == "cpu"


def test_cuda_check_refuses_an_unknown_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_check", ROOT / "benchmarks" / "cuda_check.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--device", "cpu", "--out", str(tmp_path / "c.json"), "--only", "no_such_check"])
    assert exit_info.value.code == 2 and "no_such_check" in capsys.readouterr().err


def test_writing_case_7_keeps_the_sections_after_it() -> None:
    # a run that writes case 7 rewrote docs/benchmarks.md up to its end, dropping case 8 and the CUDA check
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    page = f"# Benchmarks\n\n{run.EXPORT_SECTION}\n\nold rows\n\n## Case 8: x\n\ntext\n\n## CUDA check\n\nmore\n"
    assert run._after_export(page) == "\n## Case 8: x\n\ntext\n\n## CUDA check\n\nmore\n"
    assert run._after_export(f"# Benchmarks\n\n{run.EXPORT_SECTION}\n\nrows\n") == ""
    assert run._after_export("# Benchmarks\n") == ""
