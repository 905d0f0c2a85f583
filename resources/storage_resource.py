"""Dagster resources over the storage root (`TDA_STORAGE_URL`) and the DuckDB query engine."""

import os
from pathlib import Path

from dagster import ConfigurableResource, EnvVar, ResourceDependency

from .query_engine import QueryEngine
from .storage import Storage

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_storage_url() -> str:
    """`TDA_STORAGE_URL`, else `$DAGSTER_HOME/storage`, else `dagster_home/storage` in the checkout."""
    if os.environ.get("TDA_STORAGE_URL"):
        return os.environ["TDA_STORAGE_URL"]
    home = os.environ.get("DAGSTER_HOME") or str(REPO_ROOT / "dagster_home")
    return str(Path(home) / "storage")


class StorageResource(ConfigurableResource):
    """One storage root URL: a local folder or `s3://bucket/prefix` (endpoint and credentials from the AWS variables)."""

    url: str
    endpoint_url: str | None = None

    def storage(self) -> Storage:
        # outside a run (sensor code, `tda demo`, tests) the fields may still be unresolved EnvVars
        url, endpoint = (v.get_value() if isinstance(v, EnvVar) else v for v in (self.url, self.endpoint_url))
        return Storage(url, endpoint_url=endpoint or None)


class QueryEngineResource(ConfigurableResource):
    """DuckDB views over the storage root's parquet tables (in-memory connection; steps never hold a write lock)."""

    storage: ResourceDependency[StorageResource]

    def engine(self) -> QueryEngine:
        return QueryEngine(self.storage.storage())
