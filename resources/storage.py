"""Dagster resources over the storage root and the DuckDB query engine."""

from dagster import ConfigurableResource, EnvVar, ResourceDependency

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage


class StorageResource(ConfigurableResource):
    """One storage root URL: a local folder or `s3://bucket/prefix` (endpoint and credentials from the AWS variables)."""

    url: str
    endpoint_url: str | None = None

    def storage(self) -> Storage:
        # outside a run (sensor code, the CLI, tests) the fields may still be unresolved EnvVars
        url, endpoint = (v.get_value() if isinstance(v, EnvVar) else v for v in (self.url, self.endpoint_url))
        return Storage(url, endpoint_url=endpoint or None)


class QueryEngineResource(ConfigurableResource):
    """DuckDB views over the storage root's parquet tables (in-memory connection; steps never hold a write lock)."""

    storage: ResourceDependency[StorageResource]
    sql_dir: str | None = None

    def engine(self) -> QueryEngine:
        return QueryEngine(self.storage.storage(), self.sql_dir)
