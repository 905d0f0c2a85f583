"""The Dagster resource over the storage root."""

from dagster import ConfigurableResource, EnvVar

from tda_assets.io.storage import Storage


class StorageResource(ConfigurableResource):
    """One storage root URL: a local folder or `s3://bucket/prefix` (endpoint and credentials from the AWS
    variables)."""

    url: str
    endpoint_url: str | None = None

    def root(self) -> Storage:
        # outside a run (sensor code, the CLI, tests) the fields may still be unresolved EnvVars
        url, endpoint = (v.get_value() if isinstance(v, EnvVar) else v for v in (self.url, self.endpoint_url))
        return Storage(url, endpoint_url=endpoint or None)
