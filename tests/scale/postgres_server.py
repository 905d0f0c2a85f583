"""A throwaway PostgreSQL server on 127.0.0.1 for the tests, with password authentication.

The binaries come from the `pgserver` wheel (PyPI, in the test extras: PostgreSQL 16 built into the wheel, so
`pip install -e '.[test]'` is all a machine needs), else from Debian's `postgresql` package, else from `PATH`.
We start them ourselves with `initdb` and `pg_ctl` rather than through pgserver's API, which listens on a Unix
socket only. PostgreSQL refuses to run as root: under root the server runs as the `postgres` user (or `nobody`).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _pgserver_bin() -> Path | None:
    spec = importlib.util.find_spec("pgserver")  # not imported: its import sets up a runtime folder we do not use
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "pg_ctl").is_file():
            return candidate
    return None


def postgres_bin_dir() -> Path | None:
    """The folder with `initdb`, `pg_ctl` and `postgres`: pgserver's wheel, else Debian's newest, else PATH; None if
    none."""
    if found := _pgserver_bin():
        return found
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        "running as root and neither a `postgres` nor a `nobody` user exists: PostgreSQL will not run "
        "as root; create one (useradd postgres) or run the tests as another user"
    )


def _reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _reachable_copy(bin_dir: Path, into: Path) -> Path:
    """A copy of pgserver's install another user can reach (its binaries find their libraries relative to
    themselves)."""
    package = bin_dir.parent.parent  # .../site-packages/pgserver
    shutil.copytree(package / "pginstall", into / "pgserver" / "pginstall", symlinks=True)
    libs = package.parent / "pgserver.libs"
    if libs.is_dir():
        shutil.copytree(libs, into / "pgserver.libs", symlinks=True)
    for p in into.rglob("*"):
        p.chmod(
            p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() or p.stat().st_mode & stat.S_IXUSR else 0)
        )
    return into / "pgserver" / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server: where it listens, who may log in, and how to stop it."""

    host: str
    port: int
    user: str
    password: str
    bin_dir: Path
    root: Path
    run_as: pwd.struct_passwd | None

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        ids = dict(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[]) if self.run_as else {}
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], check=True, capture_output=True, text=True, timeout=60, **ids
        )

    def create_database(self, name: str) -> str:
        """A new empty database `name` (tests keep their instances apart this way); returns its name."""
        import psycopg2

        connection = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres"
        )
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return name

    def dagster_env(self, db: str) -> dict[str, str]:
        """The `DAGSTER_PG_*` variables dagster_home/postgres/dagster.yaml reads, for database `db`."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": db,
        }

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its files."""
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bin_dir: Path, user: str = "tda") -> PostgresServer:
    """initdb a fresh cluster in a temporary folder (password auth, scram) and start it on a free 127.0.0.1 port."""
    root_dir = Path(tempfile.mkdtemp(prefix="tda-pg-"))
    run_as = _unprivileged_user() if os.geteuid() == 0 else None
    if run_as and not _reachable_by_others(bin_dir / "pg_ctl"):
        bin_dir = _reachable_copy(bin_dir, root_dir / "install")
    if run_as:
        os.chown(root_dir, run_as.pw_uid, run_as.pw_gid)
    password = secrets.token_hex(12)
    (root_dir / "pwfile").write_text(password + "\n")
    if run_as:
        os.chown(root_dir / "pwfile", run_as.pw_uid, run_as.pw_gid)
    server = PostgresServer("127.0.0.1", 0, user, password, bin_dir, root_dir, run_as)
    server._run(
        "initdb",
        "-D",
        str(root_dir / "data"),
        "-U",
        user,
        "--pwfile",
        str(root_dir / "pwfile"),
        "--auth=scram-sha-256",
        "-E",
        "UTF8",
        "--no-sync",
    )
    (root_dir / "pwfile").unlink()
    last_error: subprocess.CalledProcessError | None = None
    for _ in range(3):  # the free port may be taken between the probe and the bind
        server.port = _free_port()
        options = (
            f"-h 127.0.0.1 -p {server.port} -k {root_dir} -c fsync=off -c synchronous_commit=off -c max_connections=200"
        )
        try:
            server._run(
                "pg_ctl", "-D", str(root_dir / "data"), "-l", str(root_dir / "server.log"), "-o", options, "-w", "start"
            )
            return server
        except subprocess.CalledProcessError as exc:
            last_error = exc
    log = (root_dir / "server.log").read_text() if (root_dir / "server.log").exists() else ""
    shutil.rmtree(root_dir, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL ({bin_dir}) did not start on 127.0.0.1: {last_error and last_error.stderr}\n{log}")
