"""DuckDB as the query engine: an in-memory connection with `sql/views.sql` over the storage root's parquet tables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from .legacy_layout import require_current_layout
from .registry import IDENTITY, TABLES, LayoutError, key
from .storage import Storage

DEFAULT_SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_TABLE_REF = re.compile(r"\{table:(?P<name>\w+)\}")
_VIEW = re.compile(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)", re.I)
_PARAMS = re.compile(r"^--\s*params:\s*(.*)$", re.M)
_LINE_COMMENT = re.compile(r"^\s*--.*$", re.M)


class QueryEngineError(RuntimeError):
    """A query failed; the message names the query and carries DuckDB's message."""


class QueryEngine:
    """An in-memory DuckDB connection with the storage root's views; never holds a write lock on a database file.

    The named queries report the current identity only (the one-row table `current_identity`): the checkpoint that
    `checkpoint/current.json` records (or `checkpoint_id`) and the loss protocol `protocol_id` (the CLI passes the
    environment's; without one, the only protocol under which the root has results of that checkpoint)."""

    def __init__(
        self,
        root: Storage,
        sql_dir: str | Path | None = None,
        protocol_id: str | None = None,
        checkpoint_id: str | None = None,
    ):
        self.root = root
        self.sql_dir = Path(sql_dir or DEFAULT_SQL_DIR)
        self.protocol_id, self.checkpoint_id = protocol_id, checkpoint_id

    def current_identity(self) -> tuple[str | None, str | None]:
        """(checkpoint_id, protocol_id) the named queries filter on; None where the root has no checkpoint yet.

        Without a given protocol: the one protocol the root has results of the checkpoint under (QueryEngineError naming
        them when there are several: set TDA_DRAWS / TDA_PROTOCOL_SEED / TDA_LOSS_PRECISION to pick one)."""
        checkpoint_id = self._checkpoint_id()
        if self.protocol_id is not None or checkpoint_id is None:
            return checkpoint_id, self.protocol_id
        protocols = sorted(
            {
                spec.parse(k)["protocol_id"]
                for spec in TABLES.values()
                if spec.partitions[:2] == IDENTITY
                for k in self.root.glob(spec.glob(checkpoint_id=checkpoint_id))
            }
        )
        if len(protocols) > 1:
            raise QueryEngineError(
                f"the storage root has results of checkpoint {checkpoint_id} under protocols "
                f"{protocols}: say which (TDA_DRAWS, TDA_PROTOCOL_SEED, TDA_LOSS_PRECISION)"
            )
        return checkpoint_id, (protocols[0] if protocols else None)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new in-memory connection with every view; a table without files yet gives an empty, typed view."""
        con = duckdb.connect(":memory:")
        if self.root.protocol == "s3":
            con.register_filesystem(self.root.fs)  # per connection: no httpfs download, same credentials
        root_url = self.root.uri()

        def table(m: re.Match[str]) -> str:
            name = m.group("name")
            if name not in TABLES:
                raise QueryEngineError(f"views.sql reads {{table:{name}}}, not a table of the layout {sorted(TABLES)}")
            spec = TABLES[name]
            return spec.duckdb_read(root_url) if self.root.has_match(spec.glob()) else spec.duckdb_empty()

        try:
            require_current_layout(self.root)
        except LayoutError as exc:
            con.close()
            raise QueryEngineError(str(exc)) from None
        try:
            con.execute(
                "CREATE OR REPLACE TABLE current_identity AS SELECT CAST($c AS VARCHAR) AS checkpoint_id, "
                "CAST($p AS VARCHAR) AS protocol_id",
                dict(zip("cp", self._identity_or_none())),
            )
            views = _LINE_COMMENT.sub("", self._read("views"))
            con.execute(_TABLE_REF.sub(table, views))
        except (duckdb.Error, QueryEngineError) as exc:
            con.close()
            raise QueryEngineError(f"creating the views of {self.sql_dir / 'views.sql'} failed: {exc}") from None
        except BaseException:
            con.close()
            raise
        return con

    def _checkpoint_id(self) -> str | None:
        if self.checkpoint_id is not None:
            return self.checkpoint_id
        record = self.root.read_if_exists(key("checkpoint_record"))
        return json.loads(record)["checkpoint_id"] if record is not None else None

    def _identity_or_none(self) -> tuple[str | None, str | None]:
        """The current identity, with protocol None where it is ambiguous (`named` raises that error instead)."""
        try:
            return self.current_identity()
        except QueryEngineError:
            return self._checkpoint_id(), None

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
        """Run a query against the views (a fresh connection, so new files are seen)."""
        con = self.connect()
        try:
            rel = con.sql(query, params=params) if params else con.sql(query)
            return rel.pl() if rel is not None else pl.DataFrame()
        except duckdb.Error as exc:
            raise QueryEngineError(f"query failed: {exc}\n--- query ---\n{query.strip()}") from None
        finally:
            con.close()

    def named(self, name: str, **params: Any) -> pl.DataFrame:
        """Run `sql/<name>.sql`, binding `$param`s: the file's `-- params:` defaults, overridden by keywords."""
        query = self._read(name)
        if "current_identity" in _LINE_COMMENT.sub("", query):
            self.current_identity()  # an ambiguous protocol is an error naming the fix, not an empty answer
        declared = parse_params(query)
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise QueryEngineError(f"named query {name!r} takes parameters {sorted(declared)}, not {unknown}")
        return self.sql(query, {**declared, **params})

    def named_queries(self) -> dict[str, str]:
        """Every named query (sql/*.sql except views) and the first line of its header comment."""
        out = {}
        for path in sorted(self.sql_dir.glob("*.sql")):
            if path.stem != "views":
                lines = path.read_text().strip().splitlines() or [""]
                out[path.stem] = lines[0].removeprefix("--").strip()
        return out

    def table_counts(self) -> dict[str, int]:
        """Row count of every view."""
        names = _VIEW.findall(self._read("views"))
        con = self.connect()
        try:
            return {n: int(con.sql(f'SELECT count(*) FROM "{n}"').fetchall()[0][0]) for n in names}
        finally:
            con.close()

    def _read(self, name: str) -> str:
        path = self.sql_dir / f"{name}.sql"
        if not path.is_file():
            have = sorted(p.stem for p in self.sql_dir.glob("*.sql"))
            raise QueryEngineError(f"no SQL file {path} (set TDA_SQL_DIR?); available: {have}")
        return path.read_text()


def parse_params(query: str) -> dict[str, Any]:
    """The `-- params: k = 10, config_id = null` header line as a dict of defaults."""
    out: dict[str, Any] = {}
    for line in _PARAMS.findall(query):
        for item in filter(None, (s.strip() for s in line.split(","))):
            name, _, default = (s.strip() for s in item.partition("="))
            if name.lstrip("$").isidentifier():  # `-- params: (none)` declares nothing
                out[name.lstrip("$")] = _literal(default)
    return out


def _literal(text: str) -> Any:
    if text.lower() in ("", "null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")
