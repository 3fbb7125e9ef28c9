"""Every code block of the docs runs; the site builds with ``mkdocs build --strict``; the
README's test command is the CI's.

The ```python blocks of README.md and docs/*.md run in this process (the blocks of one file in
order, in one namespace, so a page can build on its earlier blocks); the ```bash blocks of
docs/*.md run in bash (two at a time: each must stand alone), and a ```text block right after
one holds lines of its output; the ``>>>`` examples of the docstrings that docs/api.md renders
run as doctests.
"""

from __future__ import annotations

import doctest
import io
import os
import re
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fxtap

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_SHELL = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*\n(?:\n```text[ \t]*\n(.*?)^```[ \t]*$)?", re.MULTILINE | re.DOTALL)
_API = re.compile(r"^::: (fxtap\.\w+)[ \t]*$", re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Each ```python block of a Markdown text, with the line number its code starts on."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in _FENCE.finditer(text)]


def run_blocks(page: Path) -> None:
    # A real, registered module, so that classes defined in a block can be pickled (torch.save).
    module = types.ModuleType(f"fxtap_docs_{page.stem}")
    sys.modules[module.__name__] = module
    try:
        for line, code in python_blocks(page.read_text()):
            # Pad with newlines so tracebacks point at the Markdown file's own line numbers.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


def shell_blocks(text: str) -> list[tuple[int, str, str]]:
    """Each ```bash block with its line number and the ```text block that follows it ("" if none)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1), m.group(2) or "") for m in _SHELL.finditer(text)]


def run_shell_blocks(page: Path, tmp: Path) -> None:
    """Run the blocks two at a time (each block stands alone), then check each one's output."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's fxtap, torchrun
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    def run(code: str) -> subprocess.CompletedProcess[str]:
        command = ["bash", "-euo", "pipefail", "-c", code.replace("/tmp/", f"{tmp}/")]  # /tmp/x in the docs is tmp/x here
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)

    blocks = shell_blocks(page.read_text())
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, [code for _, code, _ in blocks]))
    for (line, _, shown), proc in zip(blocks, results):
        where = f"{page.name}:{line}"
        assert proc.returncode == 0, f"{where} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        printed = [text.rstrip() for text in (proc.stdout + proc.stderr).splitlines()]
        for expected in shown.replace("/tmp/", f"{tmp}/").splitlines():
            assert expected.rstrip() in printed, f"{where} did not print {expected!r}; it printed:\n{proc.stdout}\n{proc.stderr}"


def api_names() -> list[str]:
    return [name.removeprefix("fxtap.") for name in _API.findall((ROOT / "docs" / "api.md").read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_docs_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # pages use the repository's paths, like examples/images
    run_blocks(page)


SHELL_PAGES = [page for page in PAGES[1:] if shell_blocks(page.read_text())]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=[page.name for page in SHELL_PAGES])
def test_docs_shell_blocks_run(page: Path, tmp_path: Path) -> None:
    run_shell_blocks(page, tmp_path)


def test_docs_shell_blocks_check_their_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```bash\necho hello /tmp/x\n```\n\n```text\nhello /tmp/x\n```\n")
    run_shell_blocks(page, tmp_path)
    assert [(line, shown) for line, _, shown in shell_blocks(page.read_text())] == [(2, "hello /tmp/x\n")]
    page.write_text("```bash\necho hello\n```\n\n```text\ngoodbye\n```\n")
    with pytest.raises(AssertionError, match="did not print 'goodbye'"):
        run_shell_blocks(page, tmp_path)
    page.write_text("```bash\nfalse\necho unreachable\n```\n")
    with pytest.raises(AssertionError, match="page.md:2 exited with 1"):
        run_shell_blocks(page, tmp_path)


def test_docs_api_reference_is_the_public_api() -> None:
    assert sorted(api_names()) == sorted(fxtap.__all__)


@pytest.mark.parametrize("name", api_names())
def test_docs_api_examples_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(getattr(fxtap, name), f"fxtap.{name}", globs={}):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    assert nav == {page.name for page in PAGES[1:]}, "every page of docs/ is in the nav of mkdocs.yml, and only those"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.mark.parametrize("name", ["README.md", "index.md", "names.md", "fallback.md", "faq.md", "quickstart.md", "comparison.md"])
def test_docs_page_has_tested_examples(name: str) -> None:
    pages = {page.name: page for page in PAGES}
    assert name in pages, f"{name} is missing"
    assert python_blocks(pages[name].read_text()), f"{name} has no ```python block to test"


def test_docs_python_blocks_found_with_line_numbers() -> None:
    text = "intro\n```python\na = 1\n```\n```bash\nexit 1\n```\n```python\nb = a + 1\nassert b == 2\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = a + 1\nassert b == 2\n")]


def test_docs_failing_block_fails_with_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n```python\nassert x == 2\n```\n")
    with pytest.raises(AssertionError) as info:
        run_blocks(page)
    assert info.traceback[-1].lineno + 1 == 8  # pytest's lineno is 0-based


def test_docs_readme_test_command_is_the_ci_command() -> None:
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    command = " && ".join(ci_lines[-3:])
    readme = (ROOT / "README.md").read_text().splitlines()
    assert command in readme


def test_docs_readme_main_job_command() -> None:
    command = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 -e . && "
        "fxtap nodes resnet18 --input-shape 1,3,64,64 --grep layer1 && "
        "fxtap extract resnet18 layer2 layer4 --data examples/images -o /tmp/fxtap-features --image-size 64"
    )
    readme = (ROOT / "README.md").read_text()
    assert command in readme.splitlines()
    assert sorted(p.suffix for p in (ROOT / "examples" / "images").rglob("*.*")) == [".bmp", ".jpeg", ".jpg", ".png", ".png", ".webp"]
    assert all(p.stat().st_size < 8000 for p in (ROOT / "examples" / "images").rglob("*.*"))


def test_docs_links_resolve() -> None:
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
