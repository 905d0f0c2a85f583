"""The docs' examples run: every fenced block with the info string `sh runnable` in README.md and docs/*.md.

Each block runs with bash (`set -euo pipefail`) in a fresh temporary folder that has its own DAGSTER_HOME and storage
root and a `.venv/bin` pointing at this interpreter's, so `.venv/bin/tda …` works as written and touches nothing real.
Mark only blocks that take seconds and need no trained model; leave every other block plain `sh`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "sh runnable"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, body) of every block of `path` whose info string is MARKER."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m["body"]) for m in FENCE.finditer(text) if m["info"].strip() == MARKER
    ]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, line, body) for page in PAGES for line, body in runnable_blocks(page)]


def test_the_fence_parser_finds_only_marked_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```sh\nmake demo\n```\n\n```sh runnable\necho one\n```\n```sql\nselect 1;\n```\n")
    assert runnable_blocks(page) == [(6, "echo one\n")]


def test_the_readme_has_runnable_examples():
    assert sum(page.name == "README.md" for page, _, _ in BLOCKS) >= 2


@pytest.mark.parametrize(
    ("page", "line", "body"), BLOCKS, ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS]
)
def test_a_runnable_block_exits_zero(page: Path, line: int, body: str, tmp_path: Path):
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(Path(sys.executable).parent, target_is_directory=True)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TDA_", "DAGSTER_", "AWS_"))}
    env.update(
        DAGSTER_HOME=str(home),
        TDA_STORAGE_URL=str(tmp_path / "storage"),
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"{page.relative_to(ROOT)}:{line} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )


def view_columns(sql: str) -> dict[str, list[str]]:
    """Each view of sql/views.sql and the names of its columns (an expression's alias; `*` for a star view)."""
    views = {}
    for name, select in re.findall(r"CREATE OR REPLACE VIEW (\w+) AS\s+SELECT(.*?)\bFROM\b", sql, re.DOTALL):
        parts = [p.strip() for p in " ".join(select.split()).split(",")]
        views[name] = [re.split(r"\s+AS\s+", p)[-1].strip('"') for p in parts]
    return views


def test_the_storage_page_lists_every_view_with_its_columns():
    section = (ROOT / "docs" / "storage.md").read_text().split("## The views")[1].split("\n## ")[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    listed = {
        cells[1].strip(" `"): [c.strip(' "…') for c in re.findall(r"`([^`]*)`", cells[2])[-1].split(",")]
        for cells in rows
    }
    for name, columns in view_columns((ROOT / "sql" / "views.sql").read_text()).items():
        assert name in listed, f"docs/storage.md does not list the view {name}"
        if columns != ["*"]:
            assert listed[name] == columns, f"docs/storage.md: view {name} has {columns}"


def test_every_relative_link_of_the_docs_names_a_file_that_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
