"""The storage root: one URL (local path, file://… or s3://bucket/prefix) through fsspec, every write atomic."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import struct
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

import fsspec

if TYPE_CHECKING:
    import polars as pl
    import torch

SUCCESS_MARKER = "_SUCCESS"
HEADER_GUESS = 1 << 16  # bytes read at once for a safetensors header (most fit: one request on S3)
CACHE_STAMP = "_COMPLETE"  # in a local copy made by `cached_copy`: what it was copied from


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL or object and the fix."""


def temp_name(name: str) -> str:
    """The hidden name a file is written under before its rename: no table glob and no `Storage.glob` matches it."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def _check_key(key: str) -> str:
    parts = key.strip("/").split("/")
    if ".." in parts or "://" in key:
        raise StorageError(f"storage key {key!r} must be relative to the root (no '..' and no URL scheme)")
    return "/".join(p for p in parts if p)


class Storage:
    """One storage root URL (a local path, file://..., or s3://bucket/prefix) through fsspec; every write atomic."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, storage_options: dict | None = None):
        self.url = str(url)
        protocol, _, rest = self.url.partition("://") if "://" in self.url else ("file", "", self.url)
        if protocol == "file":
            self.protocol = "file"
            self.fs_path = os.path.abspath(os.path.expanduser(rest)).rstrip("/") or "/"
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem("file", **(storage_options or {}))
            self.endpoint_url: str | None = None
        elif protocol in ("s3", "s3a"):
            self.protocol = "s3"
            self.fs_path = rest.strip("/")
            if not self.fs_path:
                raise StorageError(f"storage URL {self.url!r} names no bucket: use s3://bucket/prefix")
            self.fs, self.endpoint_url = _s3_filesystem(endpoint_url, storage_options)
        else:
            raise StorageError(f"storage URL {self.url!r}: only local paths, file:// and s3:// are supported")
        if _is_glob(self.fs_path):
            raise StorageError(
                f"storage root {self.url!r} contains a glob character (* ? [): the table globs would break"
            )

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def bucket(self) -> str | None:
        """The S3 bucket, or None for a local root."""
        return self.fs_path.split("/", 1)[0] if self.protocol == "s3" else None

    # paths -----------------------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        """The fsspec path (no protocol) of a relative key."""
        key = _check_key(key)
        return f"{self.fs_path.rstrip('/')}/{key}" if key else self.fs_path

    def _key(self, path: str) -> str:
        return path[len(self.fs_path.rstrip("/")) + 1 :]

    def uri(self, *parts: str) -> str:
        """Full URL (s3://…) or absolute local path of a relative key."""
        path = self._path("/".join(parts))
        return f"s3://{path}" if self.protocol == "s3" else path

    def local_path(self, key: str) -> str | None:
        """A real local filesystem path when the root is local, else None."""
        return self._path(key) if self.protocol == "file" else None

    # bytes -----------------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> str:
        """Write atomically: local = temp file in the same folder then os.replace; s3 = one PUT. Returns the URI."""
        path = self._path(key)
        with self._errors(key, "write"):
            if self.protocol == "file":
                folder, name = os.path.split(path)
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, temp_name(name))
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
            else:
                self.fs.pipe_file(path, data)
                self.fs.invalidate_cache(path)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; StorageError naming it when missing."""
        with self._errors(key, "read"):
            return self.fs.cat_file(self._path(key))

    def read_if_exists(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object (other failures: StorageError with the fix)."""
        with self._errors(key, "read"):
            try:
                return self.fs.cat_file(self._path(key))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def exists(self, key: str) -> bool:
        """Whether a file or folder exists at the key."""
        with self._errors(key, "check"):
            return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        """The object's size in bytes (without reading it); StorageError naming it when missing."""
        with self._errors(key, "stat"):
            return int(self.fs.size(self._path(key)))

    def glob(self, pattern: str) -> list[str]:
        """Keys relative to the root matching the pattern, sorted; hidden names (temp files) never match."""
        with self._errors(pattern, "list"):
            if self.protocol == "s3":
                self.fs.invalidate_cache()
            paths = self.fs.glob(self._path(pattern))
        keys = (self._key(p) for p in paths)
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))

    def has_match(self, pattern: str) -> bool:
        """Whether any key matches the glob (as `glob` matches). On a local root it stops at the first match, so its
        cost does not grow with the number of files (a table of one file per query); on S3 it lists (`glob`)."""
        if self.protocol != "file":
            return bool(self.glob(pattern))
        with self._errors(pattern, "list"):
            return _first_match(self._path(""), pattern.split("/"))

    def delete(self, key: str, recursive: bool = False) -> None:
        """Remove a file (or a folder with recursive=True); a missing key is not an error."""
        path = self._path(key)
        with self._errors(key, "delete"):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
            if self.protocol == "s3":
                self.fs.invalidate_cache(path)

    # parquet ---------------------------------------------------------------------------------------------
    def write_parquet(self, key: str, df: pl.DataFrame) -> str:
        """Serialize in memory, then write atomically. Returns the URI."""
        buf = io.BytesIO()
        df.write_parquet(buf)
        return self.write_bytes(key, buf.getvalue())

    def read_parquet(self, key_or_glob: str) -> pl.DataFrame:
        """One file or the concatenation of a glob's files (partition columns: `tables.read_tables`)."""
        import polars as pl

        keys = self.glob(key_or_glob) if _is_glob(key_or_glob) else [key_or_glob]
        if not keys:
            raise StorageError(f"no parquet file matches {self.uri(key_or_glob)!r}: has the asset that writes it run?")
        frames = [pl.read_parquet(io.BytesIO(self.read_bytes(key))) for key in keys]
        return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]

    # tensors ---------------------------------------------------------------------------------------------
    def write_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Safetensors written atomically, streamed from the tensors to a file, never whole in memory (serialized, the
        file's bytes are one more model-sized set: 4.2 GB for a 1 B-parameter Fisher): on a local root a temp file then
        renamed; elsewhere a local temp file uploaded as one object."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        path = self._path(key)
        if self.protocol != "file":
            with tempfile.TemporaryDirectory(prefix="tda-tensors-") as tmp:
                local = os.path.join(tmp, os.path.basename(path))
                save_file(tensors, local, metadata=metadata)
                with self._errors(key, "write"):
                    self.fs.put_file(local, path)  # an object store shows the object only once it is complete
                    self.fs.invalidate_cache(path)
            return self.uri(key)
        with self._errors(key, "write"):
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, temp_name(name))
            try:
                save_file(tensors, tmp, metadata=metadata)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return self.uri(key)

    def read_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and the metadata of a safetensors file. On a local root each tensor is read straight into its own
        memory: the file's bytes are never held beside the tensors (4.2 GB more for a 1 B-parameter delta)."""
        from safetensors.torch import load

        if self.protocol == "file":
            header, start = self._tensors_header(key)
            if all(e["dtype"] in _DTYPES for e in _entries(header).values()):
                with self._errors(key, "read"), open(self._path(key), "rb") as f:
                    return {n: _read_into(f, start, e) for n, e in sorted(_entries(header).items())}, _metadata(header)
        data = self.read_bytes(key)
        (n,) = struct.unpack("<Q", data[:8])
        return load(data), _metadata(json.loads(data[8 : 8 + n]))

    def _tensors_header(self, key: str) -> tuple[dict, int]:
        """A safetensors file's header (tensor entries and `__metadata__`) and where its data starts, by ranged reads:
        one request when the header fits in the first HEADER_GUESS bytes, else a second for the rest."""
        path = self._path(key)
        with self._errors(key, "read"):
            head = self.fs.cat_file(path, start=0, end=HEADER_GUESS)
            (n,) = struct.unpack("<Q", head[:8])
            if 8 + n > len(head):
                head += self.fs.cat_file(path, start=len(head), end=8 + n)
            return json.loads(head[8 : 8 + n]), 8 + n

    def read_tensors_metadata(self, key: str) -> dict[str, str]:
        """The metadata of a safetensors file, reading only its header (StorageError naming it when missing)."""
        return _metadata(self._tensors_header(key)[0])

    def read_tensor(self, key: str, name: str) -> tuple[torch.Tensor | None, dict[str, str]]:
        """One tensor of a safetensors file (None when the file has no tensor `name`) and the file's metadata, reading
        only the header and that tensor's bytes: a small tensor beside a large one costs its own size, also on S3."""
        header, start = self._tensors_header(key)
        entry = _entries(header).get(name)
        return (None if entry is None else self._read_entry(key, start, name, entry)), _metadata(header)

    def _read_entry(self, key: str, start: int, name: str, entry: dict) -> torch.Tensor:
        """One tensor of a safetensors file from its header entry: on a local root read into its memory, else by one
        ranged read."""
        from safetensors.torch import load

        if self.protocol == "file" and entry["dtype"] in _DTYPES:
            with self._errors(key, "read"), open(self._path(key), "rb") as f:
                return _read_into(f, start, entry)
        begin, end = entry["data_offsets"]
        with self._errors(key, "read"):
            data = self.fs.cat_file(self._path(key), start=start + begin, end=start + end) if end > begin else b""
        own = json.dumps({name: {**entry, "data_offsets": [0, end - begin]}}).encode()
        return load(struct.pack("<Q", len(own)) + own + data)[name]

    def tensors_lazily(self, key: str) -> StoredTensors:
        """The tensors of a safetensors file as a mapping that reads each one when asked for (StorageError naming the
        file when it is missing): a caller that uses one tensor at a time never holds the whole file."""
        return StoredTensors(self, key)

    # folders ---------------------------------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, key: str) -> str:
        """Copy a local folder to the key (replacing it); `_SUCCESS` is written last. Returns the URI."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"put_dir: {local_dir} is not a folder")
        self.delete(key, recursive=True)
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{key}/{f.relative_to(local_dir).as_posix()}", f.read_bytes())
        self.write_bytes(
            f"{key}/{SUCCESS_MARKER}", uuid.uuid4().hex.encode()
        )  # a fresh token per upload: caches compare it
        return self.uri(key)

    def listing(self, key: str = "") -> dict[str, str]:
        """`relative path → size and ETag (or mtime)` of every file under a folder key; empty when there is none."""
        fs_dir = self._path(key)
        with self._errors(key, "list"):
            if self.protocol == "s3":
                self.fs.invalidate_cache()
                bucket, _, prefix = fs_dir.partition("/")  # raises for a missing bucket or refused credentials
                self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            found = self.fs.find(fs_dir, detail=True) if self.fs.isdir(fs_dir) else {}
        return {
            p[len(fs_dir) + 1 :]: f"{info.get('size')}:{info.get('ETag') or info.get('mtime')}"
            for p, info in found.items()
            if not os.path.basename(p).startswith(".")
        }

    def cached_copy(self, key: str, local_dir: str | Path, stamp: bytes, require_marker: bool = True) -> Path:
        """`local_dir` holding a copy of the folder at `key`, fetched again unless it is stamped with `stamp`.

        The copy is made in a temporary sibling folder and renamed into place, so a killed copy leaves the
        old one or none.
        """
        local_dir = Path(local_dir)
        stamp_file = local_dir / CACHE_STAMP
        if stamp and stamp_file.is_file() and stamp_file.read_bytes() == stamp:
            return local_dir
        tmp = local_dir.with_name(f".{local_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.get_dir(key, tmp, require_marker=require_marker)
        (tmp / CACHE_STAMP).write_bytes(stamp)
        shutil.rmtree(local_dir, ignore_errors=True)
        os.replace(tmp, local_dir)
        return local_dir

    def get_dir(self, key: str, local_dir: str | Path, require_marker: bool = True) -> Path:
        """Copy a complete folder (one with `_SUCCESS`, unless require_marker=False) from the key to a local folder."""
        if require_marker and not self.exists(f"{key}/{SUCCESS_MARKER}"):
            raise StorageError(
                f"{self.uri(key)} is not a complete folder (no {SUCCESS_MARKER} marker): "
                "its upload was interrupted or never happened; write it again with put_dir"
            )
        local_dir = Path(local_dir)
        fs_dir = self._path(key)
        with self._errors(key, "list"):
            files = [p for p in self.fs.find(fs_dir) if not os.path.basename(p).startswith(".")]
        for path in files:
            rel = path[len(fs_dir) + 1 :]
            if rel == SUCCESS_MARKER:
                continue
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.read_bytes(f"{key}/{rel}"))
        return local_dir

    # health ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Verify the root is reachable and writable (for s3: endpoint, credentials, bucket); StorageError if not."""
        probe = f".tda-check-{uuid.uuid4().hex[:12]}"
        if self.protocol == "s3":
            bucket, _, prefix = self.fs_path.partition("/")
            with self._errors("", "reach"):
                self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        self.write_bytes(probe, b"ok")
        self.delete(probe)

    # errors ----------------------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """Turn filesystem/S3 errors into one StorageError that names the object and the fix."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend error becomes one clear StorageError
            raise StorageError(_explain(self, exc, key, action)) from None


class StoredTensors(Mapping[str, "torch.Tensor"]):
    """The tensors of one safetensors file under a storage root, each read when asked for (its header read once)."""

    def __init__(self, root: Storage, key: str) -> None:
        header, self._start = root._tensors_header(key)
        self._root, self._key, self._entries = root, key, _entries(header)
        self.metadata = _metadata(header)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._root._read_entry(self._key, self._start, name, self._entries[name])

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # without reading the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))  # by name, as read_tensors orders them

    def __len__(self) -> int:
        return len(self._entries)


_DTYPES = {  # safetensors dtype → torch dtype, for reading a tensor straight into its memory
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _entries(header: dict) -> dict[str, dict]:
    """The tensor entries of a parsed safetensors header (without `__metadata__`)."""
    return {n: e for n, e in header.items() if n != "__metadata__"}


def _read_into(f: Any, start: int, entry: dict) -> torch.Tensor:
    """One tensor of an open safetensors file, read into a fresh tensor (safetensors data is little-endian, as here)."""
    import torch

    out = torch.empty(entry["shape"], dtype=getattr(torch, _DTYPES[entry["dtype"]]))
    begin, end = entry["data_offsets"]
    if end > begin:
        f.seek(start + begin)
        got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        if got != end - begin:
            raise StorageError(f"{f.name}: a tensor's bytes end early ({got} of {end - begin}): the file is truncated")
    return out


def _metadata(header: dict) -> dict[str, str]:
    """The `__metadata__` of a parsed safetensors header ({} when the file has none)."""
    return header.get("__metadata__", {}) or {}


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _first_match(folder: str, parts: list[str]) -> bool:
    """Whether a file under local `folder` matches the glob segments `parts` (hidden names never match)."""
    head, rest = parts[0], parts[1:]
    if not _is_glob(head):
        path = os.path.join(folder, head)
        return not head.startswith(".") and (_first_match(path, rest) if rest else os.path.isfile(path))
    try:
        entries = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return False
    with entries:
        for e in entries:
            if e.name.startswith(".") or not fnmatch.fnmatchcase(e.name, head):
                continue
            if (e.is_dir() and _first_match(e.path, rest)) if rest else e.is_file():
                return True
    return False


_S3_VARIABLES = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
)


def s3_settings() -> tuple[str | None, ...]:
    """The AWS SDK's standard variables as they are now (S3 clients made under other values are not reused)."""
    return tuple(os.environ.get(v) for v in _S3_VARIABLES)


def _s3_filesystem(
    endpoint_url: str | None, storage_options: dict | None
) -> tuple[fsspec.AbstractFileSystem, str | None]:
    """An s3fs filesystem; endpoint/region/credentials from the arguments or the standard AWS env vars."""
    import s3fs

    opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True, **(storage_options or {})}
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = endpoint_url or opts.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs.setdefault("region_name", region)
    config_kwargs = {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}}
    config_kwargs.update(opts.pop("config_kwargs", None) or {})
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs, **opts), endpoint


def _explain_s3(root: Storage, exc: BaseException, target: str) -> str | None:
    """A message for the S3 failures users can fix: endpoint, credentials, bucket."""
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    text = f"{type(exc).__name__}: {exc}"
    endpoint = root.endpoint_url or "the default AWS endpoint"
    unreachable = isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))
    if unreachable or "Could not connect" in text or "Connect timeout" in text:
        return (
            f"cannot reach the S3 endpoint {endpoint} for {target}: is the server running? "
            "Set AWS_ENDPOINT_URL (or the endpoint_url option) to your S3-compatible store. "
            "Once it is up, rerun: what was written before is kept, and no object is half-written."
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no S3 credentials for {target}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"the bucket {root.bucket!r} does not exist at {endpoint} ({target}): create it, or fix the storage URL."
    refused = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")
    if isinstance(exc, PermissionError) or any(s in text for s in refused):
        return (
            f"S3 refused the credentials for {target} at {endpoint} ({exc}): "
            "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket's permissions."
        )
    return None


def _explain(root: Storage, exc: BaseException, key: str, action: str) -> str:
    target = root.uri(key) if key else root.url
    if root.protocol == "s3":
        msg = _explain_s3(root, exc, target)
        if msg:
            return msg
    if isinstance(exc, FileNotFoundError):
        return f"no object at {target}: has the asset that writes it run? ({action} failed)"
    if isinstance(exc, PermissionError):
        return f"permission denied to {action} {target}: check the folder's permissions ({exc})"
    return f"could not {action} {target}: {type(exc).__name__}: {exc}"
