"""The query inbox: a folder (or s3:// prefix) of query files under the storage root.

A query file is `<query_id>.txt` (the prompt) or `<query_id>.json` (`prompt`, optional `seed`,
`audio_uri` of a clip to attribute instead of generating one, `target_artist`). Anyone who can drop a file
in the inbox is not trusted: `read_query_file` checks the id, size, encoding, fields and types, the prompt's
length, and that `audio_uri` lies under an allowed root (`audio_roots`), before anything reads the clip.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tda_assets.data.manifests import manifest_origin
from tda_assets.data.query_state import has_clip
from tda_assets.io.registry import entry, key
from tda_assets.io.slugs import check_query_id, slugify
from tda_assets.io.storage import Storage
from tda_assets.io.uris import read_uri_bytes, uri_exists

MAX_PROMPT_CHARS = 2000  # a prompt longer than this is refused: the text encoder reads far fewer tokens
MAX_QUERY_FILE_BYTES = 64 * 1024  # a query file is read whole: bigger ones are refused unread
QUERY_FIELDS = {"prompt": (str,), "seed": (int,), "audio_uri": (str, type(None)), "target_artist": (str, type(None))}
MAX_SEED = 2**63 - 1
DEFAULT_AUDIO_PROMPT = "music"  # the conditioning of a user's clip given without a prompt


class QueryFileError(ValueError):
    """An inbox file that cannot be a query; the message names the file, the reason and the fix."""


@dataclass(frozen=True)
class QuerySpec:
    """What a user asked to attribute."""

    query_id: str
    prompt: str
    seed: int = 0
    audio_uri: str | None = None
    target_artist: str | None = None


def inbox_files(root: Storage) -> dict[str, str]:
    """`query_id → key` of every query file in the inbox (ids are the file stems)."""
    out = {}
    inbox = entry("inbox")
    for k in root.glob(inbox.glob()):
        name = inbox.parse(k)["name"]
        stem, _, ext = name.rpartition(".")
        if ext in ("txt", "json") and stem and not name.startswith("."):
            out[stem] = k
    return out


def read_query(root: Storage, query_id: str, audio_roots: Sequence[str] = ()) -> QuerySpec:
    """The inbox file of a query, parsed and checked (`read_query_file`); FileNotFoundError when there is none."""
    check_query_id(query_id)
    path = inbox_files(root).get(query_id)
    if path is None:
        raise FileNotFoundError(
            f"query {query_id!r} has no file in the inbox {root.uri(entry('inbox').glob())}; "
            "add it with `tda add-query`"
        )
    return read_query_file(root, path, audio_roots)


def read_query_file(root: Storage, path: str, audio_roots: Sequence[str] = ()) -> QuerySpec:
    """One inbox file as a checked QuerySpec (`audio_uri` under the storage root or `audio_roots`), else
    QueryFileError."""
    uri = root.uri(path)
    name = posixpath.basename(path)
    query_id = name.rpartition(".")[0]
    try:
        check_query_id(query_id)
    except ValueError as exc:
        raise QueryFileError(f"query file {uri}: {exc}; rename the file") from None
    size = root.size(path)
    if size > MAX_QUERY_FILE_BYTES:
        raise QueryFileError(
            f"query file {uri} is {size:,} bytes; a query file is at most {MAX_QUERY_FILE_BYTES:,} bytes "
            f"(a prompt at most {MAX_PROMPT_CHARS:,} characters): shorten the prompt"
        )
    raw = root.read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QueryFileError(
            f"query file {uri} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    if name.endswith(".txt"):
        spec = QuerySpec(query_id, text.strip())
    else:
        spec = _json_query(uri, query_id, text)
    if not spec.prompt:
        raise QueryFileError(f"query file {uri}: the prompt is empty; write a text description of the music")
    if len(spec.prompt) > MAX_PROMPT_CHARS:
        raise QueryFileError(
            f"query file {uri}: the prompt is {len(spec.prompt):,} characters; at most {MAX_PROMPT_CHARS:,} "
            "are allowed: shorten it"
        )
    if spec.audio_uri is not None:
        check_audio_uri(spec.audio_uri, list(dict.fromkeys([root.uri(""), *audio_roots])), f"query file {uri}")
    return spec


def _json_query(uri: str, query_id: str, text: str) -> QuerySpec:
    """The fields of a JSON query file, each of its type."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryFileError(f"query file {uri} is not valid JSON ({exc}); fix or replace it") from None
    if not isinstance(data, dict):
        raise QueryFileError(
            f"query file {uri} holds a JSON {type(data).__name__}, not an object; "
            'write {"prompt": "…"} with optional seed, audio_uri, target_artist'
        )
    unknown = set(data) - set(QUERY_FIELDS)
    if unknown:
        raise QueryFileError(
            f"query file {uri}: unknown field(s) {sorted(unknown)[:5]}; known: {', '.join(QUERY_FIELDS)}"
        )
    for field, value in data.items():
        types = QUERY_FIELDS[field]
        if not isinstance(value, types) or isinstance(value, bool):
            wanted = " or ".join(
                {"str": "a string", "int": "an integer", "NoneType": "null"}[t.__name__] for t in types
            )
            raise QueryFileError(f"query file {uri}: {field} must be {wanted}, not {json.dumps(value)[:40]}")
    seed = data.get("seed", 0)
    if not 0 <= seed <= MAX_SEED:
        raise QueryFileError(f"query file {uri}: seed {seed} is out of range; use 0 … {MAX_SEED}")
    return QuerySpec(query_id, data.get("prompt", "").strip(), seed, data.get("audio_uri"), data.get("target_artist"))


def _location(uri: str) -> tuple[str, str]:
    """(`s3` or `file`, normalized bucket/key or real absolute path) of a local path, file:// or s3:// URI."""
    if uri.startswith(("s3://", "s3a://")):
        parts = uri.split("://", 1)[1].split("/")
        if ".." in parts:
            raise ValueError(f"{uri!r} has a '..' segment")
        return "s3", "/".join(p for p in parts if p and p != ".")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: only local paths, file:// and s3:// URIs are allowed")
    path = os.path.expanduser(uri.removeprefix("file://"))
    if not os.path.isabs(path):
        raise ValueError(f"{uri!r} is a relative path; give an absolute path or a URI")
    return "file", os.path.realpath(path)


def check_audio_uri(audio_uri: str, roots: Sequence[str], where: str) -> str:
    """`audio_uri` when it lies under one of `roots` (folders or s3:// prefixes), else QueryFileError naming both."""
    allowed = ", ".join(roots)
    fix = (
        f"copy the clip under the storage root (or the training manifest's folder), or add its folder to "
        f"TDA_ALLOWED_AUDIO_ROOTS (allowed now: {allowed})"
    )
    try:
        scheme, path = _location(audio_uri)
    except ValueError as exc:
        raise QueryFileError(f"{where}: audio_uri {exc}; {fix}") from None
    for audio_root in roots:
        root_scheme, root_path = _location(audio_root)
        if root_scheme == scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
            return audio_uri
    raise QueryFileError(f"{where}: audio_uri {audio_uri!r} is outside the allowed roots; {fix}")


def audio_roots(manifest_uri: str | None, extra: Sequence[str] = ()) -> list[str]:
    """The roots besides the storage root a query's clip may come from: the manifest's folder and the user's `extra`."""
    for audio_root in extra:
        try:
            _location(audio_root)
        except ValueError as exc:
            raise ValueError(
                f"TDA_ALLOWED_AUDIO_ROOTS: {exc}; list absolute folders or s3:// prefixes, separated by commas"
            ) from None
    if not manifest_uri:
        return list(extra)
    if "://" in manifest_uri and not manifest_uri.startswith("file://"):
        folder = manifest_uri.rsplit("/", 1)[0]
    else:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(manifest_uri.removeprefix("file://"))))
    return [folder, *extra]


def allowed_audio_roots(root: Storage, configured: Sequence[str] = ()) -> list[str]:
    """Every root a query's clip may come from: the storage root, the folder of the manifest the root was prepared from
    (recorded by `tda prepare --manifest`) and the `configured` ones (`InboxResource.audio_roots()`)."""
    return list(dict.fromkeys([root.uri(""), *audio_roots(manifest_origin(root)), *configured]))


def judge_query(root: Storage, path: str, roots: Sequence[str]) -> QuerySpec:
    """The one rule by which the inbox sensor, `tda run-inbox` and `tda queries` judge a query file: parsed and checked
    (`read_query_file`, its clip under `roots`) and, until the query's clip is in the root, that clip present."""
    spec = read_query_file(root, path, roots)
    if spec.audio_uri and not has_clip(root, spec.query_id) and not uri_exists(spec.audio_uri, root):
        raise QueryFileError(
            f"query file {root.uri(path)}: its clip {spec.audio_uri} does not exist; put the clip "
            "there, or add the query again with `tda add-query --audio FILE` (it copies the clip into "
            "the storage root)"
        )
    return spec


def judge_files(
    root: Storage, files: dict[str, str], roots: Sequence[str]
) -> tuple[dict[str, QuerySpec], dict[str, str]]:
    """Query files (`query_id → key`, as `inbox_files` gives them) judged by `judge_query`: (spec of each valid
    query, reason of each invalid one)."""
    valid, invalid = {}, {}
    for qid, path in sorted(files.items()):
        try:
            valid[qid] = judge_query(root, path, roots)
        except (ValueError, FileNotFoundError) as exc:
            invalid[qid] = str(exc)
    return valid, invalid


def _checked_prompt(prompt: str | None) -> str:
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: describe the music to attribute")
    if len(prompt.strip()) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt is {len(prompt.strip()):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed: shorten it"
        )
    return prompt.strip()


def add_clip_query(
    root: Storage,
    audio: str,
    prompt: str | None = None,
    query_id: str | None = None,
    roots: Sequence[str] = (),
    seed: int = 0,
    target_artist: str | None = None,
) -> QuerySpec:
    """A query of a user's clip (`tda attribute --audio`, `tda add-query --audio`), refused at once unless its clip
    decodes and a URI lies under `roots` (`allowed_audio_roots`); a local file is copied into the root
    (`upload_clip`)."""
    text = _checked_prompt(DEFAULT_AUDIO_PROMPT if prompt is None else prompt)
    qid = check_query_id(query_id or slugify(prompt or Path(audio).stem)[:48].strip("-_"))
    if "://" in audio:
        check_audio_uri(audio, roots, f"--audio {audio}")
        data = read_uri_bytes(audio, root)
    else:
        path = Path(audio).expanduser()
        data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise FileNotFoundError(f"audio file {audio} does not exist: give a path to a WAV/FLAC/OGG/MP3 file or a URI")
    from tda_assets.data.audio import check_clip  # soundfile and scipy: only when a clip is added

    check_clip(data, audio)
    return add_query(root, text, qid, seed, upload_clip(root, audio, qid, data), target_artist)


def add_query(
    root: Storage,
    prompt: str,
    query_id: str | None = None,
    seed: int = 0,
    audio_uri: str | None = None,
    target_artist: str | None = None,
) -> QuerySpec:
    """Drop a query file into the inbox (atomically) and return its spec."""
    prompt = _checked_prompt(prompt)
    qid = check_query_id(query_id) if query_id else slugify(prompt)[:48].strip("-_")
    spec = QuerySpec(qid, prompt, seed, audio_uri, target_artist)
    body = {k: v for k, v in asdict(spec).items() if k != "query_id" and v is not None}
    root.write_bytes(key("inbox", name=f"{qid}.json"), json.dumps(body, indent=1).encode())
    return spec


def upload_clip(root: Storage, audio: str, query_id: str, data: bytes) -> str:
    """The URI a run reads a clip from: a local file (its bytes `data`) is copied into the storage root (`uploads/`), so
    that runs on other machines (a k8s pod, an S3 root) read it too; a URI (`s3://…`, `file://…`) is kept as it is."""
    if "://" in audio:
        return audio
    return root.write_bytes(key("upload", name=f"{check_query_id(query_id)}{Path(audio).suffix.lower()}"), data)
