"""TDA_INSTANCE chooses the Dagster instance: sqlite under dagster_home/ (default) or Postgres through
dagster_home/postgres/dagster.yaml, whose connection comes from the DAGSTER_PG_* variables."""

from __future__ import annotations

import shutil

import pytest
import yaml

from resources.env import POSTGRES_VARS, REPO_ROOT, Env, dagster_home, use_dagster_home


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("DAGSTER_HOME", "TDA_INSTANCE", *POSTGRES_VARS):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_default_instance_is_sqlite_under_dagster_home(clean_env):
    assert dagster_home() == REPO_ROOT / "dagster_home"
    assert Env.read().instance == "sqlite"


def test_tda_instance_postgres_chooses_the_postgres_instance_folder(clean_env):
    clean_env.setenv("TDA_INSTANCE", "postgres")
    assert dagster_home() == REPO_ROOT / "dagster_home" / "postgres"
    assert Env.read().instance == "postgres"


def test_postgres_instance_file_reads_every_connection_setting_from_the_environment():
    config = yaml.safe_load((REPO_ROOT / "dagster_home" / "postgres" / "dagster.yaml").read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in db.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "port": {"env": "DAGSTER_PG_PORT"},
        "username": {"env": "DAGSTER_PG_USERNAME"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"},
    }
    assert db["scheme"] == "postgresql+psycopg2"
    sqlite = yaml.safe_load((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    assert config["concurrency"] == sqlite["concurrency"]  # the same run queue and pools


def test_postgres_without_its_settings_names_the_missing_variables(clean_env, tmp_path):
    shutil.copy(REPO_ROOT / "dagster_home" / "postgres" / "dagster.yaml", tmp_path / "dagster.yaml")
    clean_env.setenv("TDA_INSTANCE", "postgres")
    clean_env.setenv("DAGSTER_HOME", str(tmp_path))
    clean_env.setenv("DAGSTER_PG_HOST", "db.example")
    with pytest.raises(
        ValueError, match=r"needs DAGSTER_PG_PORT, DAGSTER_PG_USERNAME, DAGSTER_PG_PASSWORD, DAGSTER_PG_DB"
    ):
        use_dagster_home()


def test_postgres_with_a_sqlite_dagster_home_names_the_file_and_the_fix(clean_env, tmp_path):
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    clean_env.setenv("TDA_INSTANCE", "postgres")
    clean_env.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{tmp_path}/dagster.yaml does not store in Postgres: unset DAGSTER_HOME"):
        use_dagster_home()


def test_an_unknown_instance_kind_names_the_choices(clean_env):
    clean_env.setenv("TDA_INSTANCE", "mysql")
    with pytest.raises(ValueError, match=r"TDA_INSTANCE='mysql': use sqlite or postgres"):
        Env.read()
