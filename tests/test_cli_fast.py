"""The commands that only touch files import neither torch, diffusers nor the Dagster definitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "tda_assets.definitions")


@pytest.mark.parametrize(
    "argv",
    [
        ["add-query", "a slow cello line", "--id", "cello"],
        ["queries"],
        ["sql", "select 42 as answer"],
    ],
    ids=lambda a: a[0],
)
def test_file_only_command_imports_no_heavy_module(argv, tmp_path):
    code = (
        "import json, sys\nfrom tda_assets.cli import main\nrc = main(sys.argv[1:])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\nsys.exit(rc)"
    )
    env = {**os.environ, "TDA_STORAGE_URL": str(tmp_path / "storage"), "DAGSTER_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_add_query_writes_the_inbox_file_a_run_reads(tmp_path):
    env = {**os.environ, "TDA_STORAGE_URL": str(tmp_path / "storage"), "DAGSTER_HOME": str(tmp_path / "home")}
    subprocess.run(
        [sys.executable, "-m", "tda_assets.cli", "add-query", "a slow cello line", "--id", "cello", "--seed", "3"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    body = json.loads((tmp_path / "storage" / "inbox" / "cello.json").read_text())
    assert body == {"prompt": "a slow cello line", "seed": 3}
