"""The query inbox: a folder (or s3:// prefix) of query files under the storage root.

A query file is `<query_id>.txt` (the prompt) or `<query_id>.json` (`prompt`, optional `seed`,
`audio_uri` of a clip to attribute instead of generating one, `target_artist`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tda_assets.io.registry import entry, key
from tda_assets.io.slugs import check_query_id, slugify
from tda_assets.io.storage import Storage


@dataclass(frozen=True)
class QuerySpec:
    """What a user asked to attribute."""

    query_id: str
    prompt: str
    seed: int = 0
    audio_uri: str | None = None
    target_artist: str | None = None


def inbox_files(storage: Storage) -> dict[str, str]:
    """`query_id → key` of every query file in the inbox (ids are the file stems)."""
    out = {}
    inbox = entry("inbox")
    for k in storage.glob(inbox.glob()):
        name = inbox.parse(k)["name"]
        stem, _, ext = name.rpartition(".")
        if ext in ("txt", "json") and stem and not name.startswith("."):
            out[stem] = k
    return out


def read_query(storage: Storage, query_id: str) -> QuerySpec:
    """The inbox file of a query, parsed and checked (clear error when missing or malformed)."""
    check_query_id(query_id)
    path = inbox_files(storage).get(query_id)
    if path is None:
        raise FileNotFoundError(f"query {query_id!r} has no file in the inbox {storage.uri(entry('inbox').glob())}; "
                                "add it with `tda add-query`")
    text = storage.read_bytes(path).decode()
    if path.endswith(".txt"):
        spec = QuerySpec(query_id, text.strip())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"query file {path} is not valid JSON ({exc}); fix or replace it") from exc
        unknown = set(data) - {"prompt", "seed", "audio_uri", "target_artist"}
        if unknown:
            raise ValueError(f"query file {path}: unknown field(s) {sorted(unknown)}")
        spec = QuerySpec(query_id, str(data.get("prompt", "")).strip(), int(data.get("seed", 0)),
                         data.get("audio_uri"), data.get("target_artist"))
    if not spec.prompt:
        raise ValueError(f"query {query_id!r}: the prompt is empty; write a text description in {path}")
    return spec


DEFAULT_AUDIO_PROMPT = "music"  # the conditioning of a user's clip given without a prompt


def upload_clip(storage: Storage, audio: str, query_id: str) -> str:
    """The URI a run reads a clip from: a local file is copied into the storage root (`uploads/`), so that runs on
    other machines (a k8s pod, an S3 root) read it too; a URI (`s3://…`, `file://…`) is kept as it is."""
    if "://" in audio:
        return audio
    path = Path(audio).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"audio file {audio} does not exist: give a path to a WAV/FLAC/OGG/MP3 file or a URI")
    return storage.write_bytes(key("upload", name=f"{check_query_id(query_id)}{path.suffix.lower()}"), path.read_bytes())


def add_query(storage: Storage, prompt: str, query_id: str | None = None, seed: int = 0,
              audio_uri: str | None = None, target_artist: str | None = None) -> QuerySpec:
    """Drop a query file into the inbox (atomically) and return its spec."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: describe the music to attribute")
    qid = check_query_id(query_id) if query_id else slugify(prompt)[:48].strip("-_")
    spec = QuerySpec(qid, prompt.strip(), seed, audio_uri, target_artist)
    body = {k: v for k, v in asdict(spec).items() if k != "query_id" and v is not None}
    storage.write_bytes(key("inbox", name=f"{qid}.json"), json.dumps(body, indent=1).encode())
    return spec
