"""The unlearning configuration as Dagster `Config`: one named default, more from a grid file without code changes."""

import os
from pathlib import Path

import polars as pl
import yaml
from dagster import Config, RunConfig
from pydantic import Field

from .attribution.adapter import PARAM_SUBSETS
from .attribution.unlearn import UnlearningSettings
from .partitions import check_slug

GRID_FILE = Path(__file__).with_name("unlearning_grid.yaml")
UNLEARNING_ASSETS = ("unlearned_model", "unlearned_losses", "attribution_scores")
_ENGINE = UnlearningSettings()  # the engine's defaults are the one source of the Config's defaults


class UnlearningConfig(Config):
    """One unlearning configuration (DESIGN §1); `config_id` names it in every table."""

    config_id: str = Field(default="default", description="name of this configuration in the tables (a safe slug)")
    recipe: str = Field(default=_ENGINE.recipe, description="'newton' (Fisher-preconditioned step) or 'ewc_ascent'")
    lr: float = _ENGINE.lr
    steps: int = _ENGINE.steps
    lambda_: float = Field(default=_ENGINE.lambda_, description="EWC penalty weight λ (ewc_ascent); column `lambda` in the tables")
    param_subset: str = _ENGINE.param_subset
    optimizer: str = _ENGINE.optimizer
    seed: int = _ENGINE.seed
    query_draws: int = _ENGINE.query_draws
    damping: float = _ENGINE.damping
    mask_padding: str = _ENGINE.mask_padding

    def settings(self) -> UnlearningSettings:
        """The engine's settings; raises ValueError naming a bad field (unknown recipe, subset, optimizer, …)."""
        check_slug(self.config_id, "config_id")
        if self.param_subset not in PARAM_SUBSETS:
            raise ValueError(f"unknown param_subset {self.param_subset!r}: choose one of {', '.join(PARAM_SUBSETS)}")
        return UnlearningSettings(
            recipe=self.recipe, lr=self.lr, steps=self.steps, lambda_=self.lambda_, param_subset=self.param_subset,
            optimizer=self.optimizer, seed=self.seed, query_draws=self.query_draws, damping=self.damping,
            mask_padding=self.mask_padding,
        )

    def row(self) -> pl.DataFrame:
        """The `unlearning_configs` row (partition column `config_id` lives in the folder name)."""
        s = self.settings()
        return pl.DataFrame({
            "recipe": [s.recipe], "lr": [s.lr], "steps": [s.steps], "lambda": [s.lambda_],
            "param_subset": [s.param_subset], "seed": [s.seed], "optimizer": [s.optimizer],
            "query_draws": [s.query_draws], "damping": [s.damping], "mask_padding": [s.mask_padding],
        })


def unlearning_run_config(config: UnlearningConfig) -> RunConfig:
    """Run config that applies one configuration to the three per-configuration assets of a run."""
    return RunConfig(ops={name: config for name in UNLEARNING_ASSETS})


def load_grid(path: str | Path | None = None) -> list[UnlearningConfig]:
    """The configurations of the grid file (`TDA_GRID_FILE`, default `tda_assets/unlearning_grid.yaml`).

    Each entry of `configs:` is one configuration; an entry may list values for several fields
    (their product is expanded, ids get the values appended).
    """
    path = Path(path or os.environ.get("TDA_GRID_FILE") or GRID_FILE)
    spec = yaml.safe_load(path.read_text())
    out: list[UnlearningConfig] = []
    for n, entry in enumerate((spec or {}).get("configs") or [], 1):
        if not isinstance(entry, dict) or not entry.get("config_id"):
            raise ValueError(f"grid file {path}: entry {n} needs a config_id (and the fields that differ from the default)")
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
    if "lambda" in entry:  # the tables' column name, accepted for the field `lambda_`
        entry["lambda_"] = entry.pop("lambda")
    unknown = sorted(set(entry) - set(UnlearningConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: the fields are {', '.join(f for f in UnlearningConfig.model_fields if f != 'config_id')}")
    lists = {k: v for k, v in entry.items() if isinstance(v, list)}
    if not lists:
        config = UnlearningConfig(config_id=base_id, **entry)
        config.settings()  # every value checked now, not when its run starts
        return [config]
    key, values = next(iter(lists.items()))
    out = []
    for value in values:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        rest = {**entry, key: value, "config_id": f"{base_id}-{key.rstrip('_')}{text}".replace(".", "p")}
        out.extend(_expand(rest))
    return out
