"""`dagster-webserver` serves the code location, and its asset graph has the lineage of DESIGN §2."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "TDA_STORAGE_URL": str(home / "storage")}
    exe = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen(
        [str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url + "/server_info", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("dagster-webserver did not start in 180 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(
        url + "/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    for _ in range(60):  # the code location may still be loading
        data = json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]
        if data["assetNodes"]:
            return data
        time.sleep(1)
    return data


def test_ui_shows_the_lineage_checkpoint_baseline_unlearned_attribution(webserver):
    nodes = graphql(webserver, QUERY)["assetNodes"]
    deps = {n["assetKey"]["path"][0]: {d["path"][0] for d in n["dependencyKeys"]} for n in nodes}
    assert "checkpoint" in deps["baseline_losses"]
    assert "fisher_diagonal" in deps["unlearned_model"] and "checkpoint" in deps["fisher_diagonal"]
    assert "unlearned_model" in deps["unlearned_losses"]
    assert {"unlearned_losses", "baseline_losses"} <= deps["attribution_scores"]
    assert len(nodes) >= 11
