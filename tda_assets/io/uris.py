"""Reading a file named by a URI anywhere: a plain path, file://, or s3:// (with the storage root's S3 settings)."""

from __future__ import annotations

import functools

import fsspec

from .storage import Storage, s3_settings


@functools.lru_cache(maxsize=8)
def _bucket_root(bucket: str, endpoint_url: str | None, _settings: tuple) -> Storage:
    return Storage(f"s3://{bucket}", endpoint_url=endpoint_url)


def read_uri_bytes(uri: str | None, root: Storage) -> bytes | None:
    """Bytes of a file anywhere (plain path, file://, s3://); None if it does not exist.

    s3:// objects are read through an s3fs client configured like the storage root (endpoint, region and
    credentials); an unreachable endpoint or refused credentials raise StorageError.
    """
    if not uri:
        return None
    if uri.startswith(("s3://", "s3a://")):
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        endpoint = root.endpoint_url if root.protocol == "s3" else None
        return _bucket_root(bucket, endpoint, s3_settings()).read_if_exists(key)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def uri_exists(uri: str, root: Storage) -> bool:
    """Whether a file exists at a URI (plain path, file://, s3://), without reading it."""
    if uri.startswith(("s3://", "s3a://")):
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        endpoint = root.endpoint_url if root.protocol == "s3" else None
        return _bucket_root(bucket, endpoint, s3_settings()).exists(key)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isfile(path)
