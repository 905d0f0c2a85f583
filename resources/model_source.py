"""Where the checkpoint comes from: `embedded`, a local folder, an `s3://` folder, or `hf://<repo>@<revision>`."""

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dagster import ConfigurableResource

from tda_assets.attribution.errors import ModelSourceError
from tda_assets.attribution.model_folder import read_model_info


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
    if repo.count("/") != 1:
        raise ModelSourceError(f"checkpoint {source!r}: write a hub checkpoint as hf://<org>/<name>@<revision>")
    return repo, revision or None


def resolve_hf(source: str, token: str | None = None, cache_dir: str | None = None) -> ResolvedModel:
    """Download (or find in the local hub cache, honouring HF_HUB_OFFLINE) a pinned hub snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hf(source)
    if revision is None:
        raise ModelSourceError(f"checkpoint {source!r} has no revision: pin one, e.g. hf://{repo}@<commit sha or tag>")
    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision, token=token, cache_dir=cache_dir))
    except RevisionNotFoundError as exc:
        raise ModelSourceError(f"checkpoint {source!r}: revision {revision!r} does not exist in {repo}; check the tag or commit") from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(f"checkpoint {source!r}: repository {repo} not found (or HF_TOKEN lacks access)") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"checkpoint {source!r}: not in the local hub cache and the hub is offline (HF_HUB_OFFLINE=1); "
            "download it once with network access or point HF_HOME at a cache that has it"
        ) from exc
    read_model_info(folder)
    return ResolvedModel(f"hf-{repo.replace('/', '-')}-{folder.name[:12]}", folder, source, folder.name)


def resolve_folder(source: str, cache_dir: str | None = None) -> ResolvedModel:
    """A local folder (path or file://) or an `s3://` folder copied to a local cache."""
    if source.startswith("s3://"):
        import fsspec

        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ.get("AWS_ENDPOINT_URL")} if os.environ.get("AWS_ENDPOINT_URL") else {})
        local = Path(cache_dir or tempfile.gettempdir()) / "tda-models" / _slug(source)
        if not (local / "_COMPLETE").exists():
            if not fs.exists(source):
                raise ModelSourceError(f"checkpoint {source!r}: no such folder on S3; check the bucket and prefix")
            fs.get(source.rstrip("/") + "/", str(local), recursive=True)
            (local / "_COMPLETE").write_text(source)
        read_model_info(local)
        return ResolvedModel(f"s3-{_slug(source)}", local, source)
    folder = Path(source.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(f"checkpoint {source!r}: folder not found; give a diffusers model folder, s3://…, hf://…@rev or 'embedded'")
    read_model_info(folder)
    return ResolvedModel(f"local-{_slug(str(folder.resolve()))}", folder, source)


class ModelSourceResource(ConfigurableResource):
    """The checkpoint to attribute: `embedded` (trained by the `checkpoint` asset), a folder, `s3://…` or `hf://repo@rev`."""

    source: str = "embedded"
    hf_token: str | None = None
    cache_dir: str | None = None
    train_steps: int = 1000
    train_seed: int = 0

    @property
    def is_embedded(self) -> bool:
        return self.source == "embedded"

    def resolve(self) -> ResolvedModel:
        """Resolve a non-embedded source to a local model folder (raises ModelSourceError with the fix)."""
        if self.is_embedded:
            raise ModelSourceError("the embedded checkpoint is trained by the `checkpoint` asset, not resolved")
        if self.source.startswith("hf://"):
            return resolve_hf(self.source, self.hf_token, self.cache_dir)
        return resolve_folder(self.source, self.cache_dir)
