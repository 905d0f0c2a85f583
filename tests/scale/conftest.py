"""Fixtures of the scale tests: one real PostgreSQL server on 127.0.0.1 for the session."""

from __future__ import annotations

import pytest

from tests.scale.postgres_server import PostgresServer, postgres_bin_dir, start_postgres


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A PostgreSQL server (pgserver's wheel, else Debian's `postgresql`), stopped and deleted after the session."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries: install the test extras (pip install -e '.[test]', which brings "
            "the pgserver wheel) or Debian's postgresql (apt-get install postgresql)"
        )
    server = start_postgres(bin_dir)
    yield server
    server.stop()
