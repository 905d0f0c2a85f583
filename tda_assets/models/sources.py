"""Where the checkpoint comes from: `embedded`, a local folder, an `s3://` folder, or `hf://<repo>@<revision>` (no
Dagster)."""

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tda_assets.attribution.errors import ModelSourceError
from tda_assets.models.model_folder import read_model_info


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint made concrete: its id, a local diffusers folder, and what it was resolved from."""

    checkpoint_id: str
    folder: Path
    source: str
    revision: str | None = None


def _slug(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def parse_hf(source: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` → (`org/name`, `rev`)."""
    spec = source[len("hf://") :]
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelSourceError(f"checkpoint {source!r}: write a hub checkpoint as hf://<org>/<name>@<revision>")
    return repo, revision or None


def _cached_revisions(cache: str | None, repo: str) -> list[str] | None:
    """Branches/tags and commits of `repo` in the local hub cache, or None when the repo is not cached at all."""
    from huggingface_hub import constants

    folder = Path(cache or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    if not folder.is_dir():
        return None
    refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
    snapshots = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    return refs + snapshots


def resolve_hf(
    source: str, token: str | None = None, cache_dir: str | None = None, offline: bool = False
) -> ResolvedModel:
    """Download (or, `offline`, find in the local hub cache `cache_dir`) a pinned hub snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hf(source)
    if revision is None:
        raise ModelSourceError(f"checkpoint {source!r} has no revision: pin one, e.g. hf://{repo}@<commit sha or tag>")
    cache = cache_dir
    try:
        folder = Path(
            snapshot_download(repo_id=repo, revision=revision, token=token, cache_dir=cache, local_files_only=offline)
        )
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"checkpoint {source!r}: revision {revision!r} does not exist in {repo}; check the tag or commit"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"checkpoint {source!r}: repository {repo} not found (or HF_TOKEN lacks access)"
        ) from exc
    except HFValidationError as exc:
        raise ModelSourceError(f"checkpoint {source!r}: {repo!r} is not a valid hub repository id ({exc})") from exc
    except IncompleteSnapshotError as exc:
        raise ModelSourceError(
            f"checkpoint {source!r}: the cached snapshot of {repo}@{revision} is incomplete; "
            "download it again with network access (HF_HUB_OFFLINE unset)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        cached = _cached_revisions(cache, repo)
        where = f"the hub cache {cache or 'at HF_HOME'}"
        if cached is None:
            what = f"repository {repo} is not in {where}"
        else:
            what = f"revision {revision!r} of {repo} is not in {where} (cached: {', '.join(cached) or 'none'})"
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
        raise ModelSourceError(
            f"checkpoint {source!r}: {what} and {reason}; download it once with network access "
            "or point HF_HOME at a cache that has it"
        ) from exc
    read_model_info(folder)
    return ResolvedModel(f"hf-{repo.replace('/', '-')}-{folder.name[:12]}", folder, source, folder.name)


def model_copies_dir(cache_dir: str | None) -> Path:
    """Where local copies of model folders (from S3 or a remote storage root) go: `<cache_dir or tmp>/tda-models`."""
    return Path(cache_dir or tempfile.gettempdir()) / "tda-models"


def _resolve_s3_folder(source: str, cache_dir: str | None) -> ResolvedModel:
    """Copy an `s3://` model folder to a local cache keyed by its listing (so a re-upload is a new checkpoint)."""
    from tda_assets.io.storage import Storage, StorageError

    try:
        root = Storage(source)  # endpoint, region and credentials from the AWS variables, S3 errors explained
        listing = root.listing()
    except StorageError as exc:
        raise ModelSourceError(f"checkpoint {source!r}: {exc}") from None
    if not listing:
        raise ModelSourceError(
            f"checkpoint {source!r}: no such folder on S3 (no objects under it); check the bucket and prefix"
        )
    checkpoint_id = f"s3-{_slug(repr(sorted(listing.items())))}"
    try:
        local = root.cached_copy("", model_copies_dir(cache_dir) / checkpoint_id, source.encode(), require_marker=False)
    except StorageError as exc:
        raise ModelSourceError(f"checkpoint {source!r}: {exc}") from None
    read_model_info(local)
    return ResolvedModel(checkpoint_id, local, source)


def resolve_folder(source: str, cache_dir: str | None = None) -> ResolvedModel:
    """A local folder (path or file://) or an `s3://` folder copied to a local cache."""
    if source.startswith("s3://"):
        return _resolve_s3_folder(source, cache_dir)
    folder = Path(source.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(
            f"checkpoint {source!r}: folder not found; give a diffusers model folder, s3://…, hf://…@rev or 'embedded'"
        )
    read_model_info(folder)
    return ResolvedModel(f"local-{_slug(str(folder.resolve()))}", folder, source)


def resolve_source(
    source: str,
    token: str | None = None,
    hub_cache: str | None = None,
    offline: bool = False,
    copies_dir: str | None = None,
) -> ResolvedModel:
    """Any non-embedded source to a local model folder (raises ModelSourceError with the fix)."""
    if source == "embedded":
        raise ModelSourceError("the embedded checkpoint is trained by the `checkpoint` asset, not resolved")
    if source.startswith("hf://"):
        return resolve_hf(source, token, hub_cache, offline)
    return resolve_folder(source, copies_dir)


def embedded_encoder_id() -> str:
    """The identity of the embedded model's frozen encoders (mel front end and text encoder)."""
    from tda_assets.models.embedded.mel import MelFrontend
    from tda_assets.models.embedded.model import encoder_config

    return encoder_id_of(encoder_config(MelFrontend()))


def encoder_id_of(config: dict) -> str:
    """A short identity from an encoder description."""
    return "enc-" + hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=5).hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """The checkpoint to attribute and where model files are cached: `embedded`, a folder, `s3://…` or `hf://repo@rev`."""

    source: str = "embedded"
    hf_token: str | None = None
    cache_dir: str | None = (
        None  # copies of S3 model folders go under <cache_dir>/tda-models (default: the temp folder)
    )
    hub_cache: str | None = None  # the hub cache (default: huggingface_hub's own)
    offline: bool = False
    train_steps: int = 1000
    train_seed: int = 0

    @property
    def is_embedded(self) -> bool:
        return self.source == "embedded"

    def resolve(self, source: str | None = None) -> ResolvedModel:
        """Resolve this (or a recorded) non-embedded source to a local model folder (ModelSourceError with the fix)."""
        return resolve_source(source or self.source, self.hf_token, self.hub_cache, self.offline, self.cache_dir)

    def encoder_id(self) -> str:
        """The identity of the frozen encoders that make training features: the embedded ones, or the checkpoint's
        own."""
        return embedded_encoder_id() if self.is_embedded else self.resolve().checkpoint_id
