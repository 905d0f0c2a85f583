"""The commands honour the configured executor: with TDA_EXECUTOR=multiprocess, `Runner` (behind `tda prepare`,
`attribute`, `run-inbox`, `demo`) runs the code location's job, its steps in processes of the multiprocess executor."""

from __future__ import annotations

from dagster import DagsterInstance

from tda_assets.experiments.runner import Runner
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table


def test_a_runner_on_the_multiprocess_executor_runs_steps_in_child_processes(tmp_path, monkeypatch):
    home, root_dir = tmp_path / "home", tmp_path / "storage"
    home.mkdir()
    for name, value in {
        "DAGSTER_HOME": str(home),
        "TDA_STORAGE_URL": str(root_dir),
        "TDA_EXECUTOR": "multiprocess",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    instance = DagsterInstance.get()
    runner = Runner.create(instance, log=lambda _m: None)
    assert runner.executor == "multiprocess"
    result = runner.run(
        ["training_manifest"],
        run_config={"ops": {"training_manifest": {"config": {"clips_per_artist": 2, "artists": 2}}}},
    )
    assert result.success
    messages = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("Executing steps using multiprocess executor" in m for m in messages)
    assert instance.get_run_by_id(result.run_id).job_name == "__ASSET_JOB"
    assert read_table(Storage(str(root_dir)), "training_manifest").height == 4
    instance.dispose()
