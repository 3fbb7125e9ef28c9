"""Every ```python block of README.md and docs/*.md runs; the README's test command is the CI's.

The blocks of one file run in order in one namespace, so a page can build on its earlier blocks.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


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


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_docs_python_blocks_run(page: Path) -> None:
    run_blocks(page)


@pytest.mark.parametrize("name", ["README.md", "index.md", "names.md", "fallback.md", "faq.md"])
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
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 "
        "-e '.[test]' && python examples/resnet18_features.py"
    )
    readme = (ROOT / "README.md").read_text()
    assert command in readme.splitlines()
    assert (ROOT / "examples" / "resnet18_features.py").is_file()


def test_docs_links_resolve() -> None:
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
