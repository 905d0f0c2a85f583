"""The environment, read in one place: every `TDA_*` setting (and the hub's cache variables) with its default.

Plain Python (no Dagster, torch or diffusers), so the fast commands of the CLI can read it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from tda_assets.attribution.protocol_id import check_precision, protocol_id

REPO_ROOT = Path(__file__).resolve().parent.parent


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; unset it or give a number (default {default})") from None


def _optional_int(name: str) -> int | None:
    """An integer variable, None when unset (its consumer's default applies)."""
    return _int(name, 0) if os.environ.get(name, "").strip() else None


def _seconds(name: str, default: int, minimum: int) -> int:
    """An integer variable of seconds, at least `minimum`."""
    value = _int(name, default)
    if value < minimum:
        raise ValueError(
            f"{name}={value} is below {minimum} s; unset it (default {default}) or give at least {minimum}"
        )
    return value


def _at_least(name: str, default: int, minimum: int) -> int:
    """An integer variable of at least `minimum`."""
    value = _int(name, default)
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}; unset it (default {default}) or give at least {minimum}")
    return value


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated variable as a tuple of its non-empty items."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


INSTANCES = {"sqlite": "dagster_home", "postgres": "dagster_home/postgres"}  # TDA_INSTANCE → default instance folder
POSTGRES_VARS = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def instance_kind() -> str:
    """`TDA_INSTANCE`: `sqlite` (default: files under DAGSTER_HOME) or `postgres` (dagster-postgres, `DAGSTER_PG_*`)."""
    kind = (os.environ.get("TDA_INSTANCE") or "sqlite").strip().lower()
    if kind not in INSTANCES:
        raise ValueError(f"TDA_INSTANCE={kind!r}: use {' or '.join(INSTANCES)} (unset means sqlite)")
    return kind


def dagster_home() -> Path:
    """`DAGSTER_HOME`, else the checkout's instance folder of `TDA_INSTANCE` (`dagster_home/` or
    `dagster_home/postgres/`)."""
    return Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / INSTANCES[instance_kind()]).resolve()


def stores_in_postgres(home: Path) -> bool:
    """Whether the instance file `home/dagster.yaml` keeps runs and events in Postgres (dagster-postgres)."""
    import yaml

    path = home / "dagster.yaml"
    config = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    parts = [config.get(k) or {} for k in ("run_storage", "event_log_storage", "schedule_storage")]
    return "postgres" in (config.get("storage") or {}) or any(
        str(p.get("module", "")).startswith("dagster_postgres") for p in parts
    )


def check_instance(home: Path) -> None:
    """With TDA_INSTANCE=postgres: the instance at `home` must be a Postgres one and every `DAGSTER_PG_*` must be
    set."""
    if instance_kind() != "postgres":
        return
    if not stores_in_postgres(home):
        raise ValueError(
            f"TDA_INSTANCE=postgres but {home / 'dagster.yaml'} does not store in Postgres: unset DAGSTER_HOME "
            f"(then {REPO_ROOT / INSTANCES['postgres']} is used) or copy "
            f"{REPO_ROOT / INSTANCES['postgres'] / 'dagster.yaml'} there"
        )
    missing = [name for name in POSTGRES_VARS if not has(name)]
    if missing:
        raise ValueError(
            f"TDA_INSTANCE=postgres needs {', '.join(missing)} (the Postgres server's host, port, user, "
            f"password and database; see README, 'Postgres and Kubernetes')"
        )


def use_dagster_home() -> Path:
    """The instance folder (created if missing, checked against TDA_INSTANCE), exported as DAGSTER_HOME for Dagster
    and its steps."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    check_instance(home)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def default_storage_url() -> str:
    """`TDA_STORAGE_URL`, else `$DAGSTER_HOME/storage`."""
    return os.environ.get("TDA_STORAGE_URL") or str(dagster_home() / "storage")


def hub_cache(cache_dir: str | None = None) -> str | None:
    """The hub cache: `cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub (read now; huggingface_hub reads them at
    import)."""
    if cache_dir:
        return cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set."""
    return _true(os.environ.get("HF_HUB_OFFLINE"))


def shard_count() -> int:
    """`TDA_SHARDS`: how many static shard partitions the training data has (default 4)."""
    return _int("TDA_SHARDS", 4)


@dataclass(frozen=True)
class Env:
    """Every `TDA_*` variable, read once by `Env.read()`; the defaults are the product's defaults."""

    storage_url: str
    aws_endpoint_url: str | None = None
    checkpoint: str = "embedded"
    model_cache: str | None = None
    train_steps: int = 1000
    device: str = "auto"
    batch_size: int | None = None  # None: the engine's default rows per forward pass (attribution/devices.py)
    grad_rows: int | None = None  # rows per pass of a gradient; None: all of an item's (or query's) draws at once
    draws: int = 16
    protocol_seed: int = 0
    loss_precision: str = "fp32"  # what per-draw losses are measured in: part of the protocol's id
    executor: str = "in_process"
    instance: str = "sqlite"
    manifest: str | None = None
    clips_per_artist: int = 40
    max_queries_per_tick: int = 10
    max_query_partitions: int = 10_000  # past it, new pending queries run in batches (`query_batches`), not partitions
    queries_per_batch: int = 100
    allowed_audio_roots: tuple[str, ...] = ()
    grid_file: str | None = None
    sql_dir: str | None = None
    # `tda evaluate`'s samples: None (unset) keeps the default of experiments/options.py's EvaluateOptions
    grid_queries: int | None = None
    cf_queries: int | None = None
    si_targets: int | None = None
    rep_sources: int | None = None
    cf_train_steps: int | None = None  # 0 is unset too
    slot_wait_s: int = 1800  # a step waiting longer for a pool slot gives up, naming the holder
    run_stale_s: int = 300  # a run of another host with no heartbeat (every 30 s) for this long is released as dead

    @classmethod
    def read(cls) -> "Env":
        """The environment as it is now."""
        d = {f.name: f.default for f in fields(cls) if f.name != "storage_url"}
        get = lambda name: os.environ.get(name) or None  # noqa: E731
        return cls(
            storage_url=default_storage_url(),
            aws_endpoint_url=get("AWS_ENDPOINT_URL"),
            checkpoint=get("TDA_CHECKPOINT") or d["checkpoint"],
            model_cache=get("TDA_MODEL_CACHE"),
            train_steps=_int("TDA_TRAIN_STEPS", d["train_steps"]),
            device=get("TDA_DEVICE") or d["device"],
            batch_size=_int("TDA_BATCH_SIZE", d["batch_size"]),
            grad_rows=_int("TDA_GRAD_ROWS", 0) or None,
            draws=_int("TDA_DRAWS", d["draws"]),
            protocol_seed=_int("TDA_PROTOCOL_SEED", d["protocol_seed"]),
            loss_precision=check_precision((get("TDA_LOSS_PRECISION") or d["loss_precision"]).strip().lower()),
            executor=get("TDA_EXECUTOR") or d["executor"],
            instance=instance_kind(),
            manifest=get("TDA_MANIFEST"),
            clips_per_artist=_int("TDA_CLIPS_PER_ARTIST", d["clips_per_artist"]),
            max_queries_per_tick=_int("TDA_MAX_QUERIES_PER_TICK", d["max_queries_per_tick"]),
            max_query_partitions=_at_least("TDA_MAX_QUERY_PARTITIONS", d["max_query_partitions"], 0),
            queries_per_batch=_at_least("TDA_QUERIES_PER_BATCH", d["queries_per_batch"], 1),
            allowed_audio_roots=_list("TDA_ALLOWED_AUDIO_ROOTS"),
            grid_file=get("TDA_GRID_FILE"),
            sql_dir=get("TDA_SQL_DIR"),
            grid_queries=_optional_int("TDA_GRID_QUERIES"),
            cf_queries=_optional_int("TDA_CF_QUERIES"),
            si_targets=_optional_int("TDA_SI_TARGETS"),
            rep_sources=_optional_int("TDA_REP_SOURCES"),
            cf_train_steps=_int("TDA_CF_TRAIN_STEPS", 0) or None,
            slot_wait_s=_seconds("TDA_SLOT_WAIT_S", d["slot_wait_s"], 1),
            run_stale_s=_seconds("TDA_RUN_STALE_S", d["run_stale_s"], 60),  # two heartbeats (every 30 s) at least
        )

    @property
    def protocol_id(self) -> str:
        """The id of the loss protocol these settings give (`LossProtocolResource` builds the same protocol)."""
        return protocol_id(self.protocol_seed, self.draws, precision=self.loss_precision)

    def with_storage(self, storage_url: str | None) -> "Env":
        """The same settings on another storage root (tests, `--storage`)."""
        from dataclasses import replace

        return replace(self, storage_url=storage_url) if storage_url else self


def has(name: str) -> bool:
    """Whether a variable is set (non-empty); secrets are passed to Dagster as EnvVar, never read as values here."""
    return bool(os.environ.get(name))
