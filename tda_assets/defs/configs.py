"""The unlearning configuration as a Dagster `Config` derived from the engine's `UnlearningSettings`, and the grid
file."""

from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import polars as pl
import yaml
from dagster import Config, RunConfig
from pydantic import Field

from tda_assets.attribution.settings import UnlearningSettings, settings_from_row, settings_row
from tda_assets.io.slugs import check_slug
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, table_exists, write_table

GRID_FILE = Path(__file__).resolve().parents[1] / "experiments" / "unlearning_grid.yaml"
UNLEARNING_ASSETS = ("unlearned_model", "unlearned_losses", "attribution_scores")


class _UnlearningConfigBase(Config):
    config_id: str = Field(default="default", description="name of this configuration in the tables (a safe slug)")

    def settings(self) -> UnlearningSettings:
        """The engine's settings; raises ValueError naming a bad field (unknown recipe, subset, optimizer, …)."""
        check_slug(self.config_id, "config_id")
        return UnlearningSettings(**{f.name: getattr(self, f.name) for f in fields(UnlearningSettings)})

    def row(self) -> pl.DataFrame:
        """The `unlearning_configs` row (partition column `config_id` lives in the folder name)."""
        return pl.DataFrame([settings_row(self.settings())])


def config_class(name: str, source: type, base: type[Config], doc: str, defaults: dict | None = None) -> type:
    """A Dagster config class on `base` with one field per field of the engine dataclass `source` (same names and
    docs; defaults from `defaults` where given, else the dataclass's), so the Config never restates the fields."""
    hints = get_type_hints(source)
    namespace: dict = {"__module__": __name__, "__annotations__": {}, "__doc__": doc}
    for f in fields(source):
        namespace["__annotations__"][f.name] = hints[f.name]
        default = (defaults or {}).get(f.name, f.default)
        namespace[f.name] = Field(default=default, description=f.metadata.get("doc"))
    return type(name, (base,), namespace)


UnlearningConfig = config_class(
    "UnlearningConfig",
    UnlearningSettings,
    _UnlearningConfigBase,
    "One unlearning configuration (DESIGN §1): the engine's UnlearningSettings and a config_id.",
)


def recorded_settings(root: Storage, config_id: str) -> UnlearningSettings:
    """The recorded settings of `config_id` (the engine's defaults for an unrecorded `default`)."""
    if table_exists(root, "unlearning_configs", config_id=config_id):
        return settings_from_row(read_table(root, "unlearning_configs", config_id=config_id).row(0, named=True))
    if config_id == "default":
        return UnlearningSettings()
    raise FileNotFoundError(
        f"unlearning configuration {config_id!r} is not recorded: run it once with its run config "
        "(`tda attribute --config`, or the grid), which records it"
    )


def require_full_exact(settings: UnlearningSettings, config_id: str, what: str) -> UnlearningSettings:
    """`settings` when they rescore every item exactly; else a ValueError: `what` (self-influence, replication) judges a
    configuration by its full exact rescore, which a `linearized` or `two_stage` configuration does not compute."""
    if not settings.is_full_exact:
        raise ValueError(
            f"{what} rescores every item exactly, but configuration {config_id!r} is method "
            f"{settings.method!r}, stage {settings.stage!r}: judge a method 'unlearning', stage 'full' "
            f"configuration (its fast paths are measured against that one), or leave {config_id!r} out"
        )
    return settings


def as_config(config_id: str, settings: UnlearningSettings) -> UnlearningConfig:
    """The Dagster config of `settings` under the name `config_id`."""
    return UnlearningConfig(
        config_id=config_id, **{f.name: getattr(settings, f.name) for f in fields(UnlearningSettings)}
    )


def partition_config(config: UnlearningConfig, root: Storage, config_id: str) -> UnlearningConfig:
    """What a (query × config) partition runs: the run's config when it names the partition's configuration, else the
    recorded one (a partition launched from the UI with the untouched default run config)."""
    if config.config_id == config_id:
        return config
    if config.config_id != "default":
        raise ValueError(
            f"the run config is configuration {config.config_id!r} but the partition's is {config_id!r}: "
            f"launch partition {config.config_id!r} instead, or set config_id to {config_id!r}"
        )
    return as_config(config_id, recorded_settings(root, config_id))


def record_config(root: Storage, config: UnlearningConfig) -> None:
    """Write the configuration's `unlearning_configs` row (what its config partition runs when launched without
    config)."""
    write_table(root, "unlearning_configs", config.row(), config_id=config.config_id)


def unlearning_run_config(config: UnlearningConfig) -> RunConfig:
    """Run config that applies one configuration to the three per-configuration assets of a run."""
    return RunConfig(ops={name: config for name in UNLEARNING_ASSETS})


def load_grid(path: str | Path | None = None) -> list[UnlearningConfig]:
    """The configurations of a grid file (default `tda_assets/experiments/unlearning_grid.yaml`).

    Each entry of `configs:` is one configuration; an entry may list values for several fields
    (their product is expanded, ids get the values appended).
    """
    path = Path(path or GRID_FILE)
    spec = yaml.safe_load(path.read_text())
    out: list[UnlearningConfig] = []
    for n, entry in enumerate((spec or {}).get("configs") or [], 1):
        if not isinstance(entry, dict) or not entry.get("config_id"):
            raise ValueError(
                f"grid file {path}: entry {n} needs a config_id (and the fields that differ from the default)"
            )
        try:
            out.extend(_expand(dict(entry)))
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"grid file {path}: configuration {entry['config_id']!r}: {exc}") from None
    if not out:
        raise ValueError(f"grid file {path}: no configurations under `configs:`")
    ids = [c.config_id for c in out]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"grid file {path}: duplicate config_id(s) {sorted(dupes)}")
    return out


def _expand(entry: dict) -> list[UnlearningConfig]:
    base_id = entry.pop("config_id")
    lists = {k: v for k, v in entry.items() if isinstance(v, list)}
    if not lists:
        settings = settings_from_row(entry)  # every value checked now (unknown fields too), not when its run starts
        config = as_config(base_id, settings)
        config.settings()
        return [config]
    field_name, values = next(iter(lists.items()))
    out = []
    for value in values:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        rest = {**entry, field_name: value, "config_id": f"{base_id}-{field_name.rstrip('_')}{text}".replace(".", "p")}
        out.extend(_expand(rest))
    return out
