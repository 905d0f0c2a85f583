"""The options of `tda evaluate`: one field list that the command's arguments, their defaults and help derive from.

Plain Python (no Dagster, torch or polars), so the command line can build its parser from it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

# `tda evaluate` retrains the counterfactual models for at most this many steps unless told (TDA_CF_TRAIN_STEPS): each
# query costs 2 retrains (its top-k, its same-artist control), the 3 random removals are shared, plus one full model;
# at ~0.25 s a step on 2 idle cores (320 items) a retrain of 400 steps is ~105 s (527 s for 5 measured), so 4 queries
# are 12 retrains, ~21 min
CF_TRAIN_STEPS_CAP = 400


def _option(default: object, help: str, env: bool = False) -> Any:
    """An option with its help text; `env`: the variable `TDA_<NAME>` (read in resources/env.py) overrides the
    default."""
    return field(default=default, metadata={"help": help, "env": env})


def env_variable(name: str) -> str:
    """The environment variable that overrides option `name`'s default: `TDA_` and the name in capitals."""
    return f"TDA_{name.upper()}"


@dataclass(frozen=True)
class EvaluateOptions:
    """What `tda evaluate` runs and on how many samples; the defaults are the goals' samples, sized to fit ~45 min
    on 2 cores (docs/experiments.md)."""

    grid_queries: int = _option(4, "run the grid on the first N built-in queries (0 = all)", env=True)
    grid_file: str | None = _option(
        None, "grid YAML (default: TDA_GRID_FILE or tda_assets/experiments/unlearning_grid.yaml)"
    )
    force: bool = _option(False, "re-run the grid's (query, configuration) pairs already recorded")
    cf_queries: int = _option(
        4,
        "queries of the counterfactual check (two retrains each: top-k and the same-artist control, plus 3 random "
        "removals shared by all; the default, the goal's sample, takes ~21 min on 2 cores)",
        env=True,
    )
    cf_k: int = _option(10, "training items removed per query by the counterfactual check")
    cf_train_steps: int | None = _option(
        None,
        f"retraining steps of the counterfactual check (default: the checkpoint's, at most {CF_TRAIN_STEPS_CAP}, "
        "to fit 45 min on 2 cores)",
        env=True,
    )
    skip_counterfactual: bool = _option(False, "skip the counterfactual check (its retrains are most of the time)")
    si_configs: str = _option(
        "default,skew,newton-fixed,newton-target",
        "configurations judged by the self-influence protocol (comma-separated; empty to skip)",
    )
    si_targets: int = _option(
        32,
        "self-influence reporting targets (k-means-chosen training items outside the 16 development targets; "
        "the default is the goal's sample)",
        env=True,
    )
    rep_sources: int = _option(
        20,
        "replication reporting sources: items (outside the development targets) whose transformed audio is a "
        "query (0 to skip; the default is the goal's sample)",
        env=True,
    )

    @classmethod
    def from_env(cls, env: Any) -> "EvaluateOptions":
        """The defaults, each replaced by its `TDA_<NAME>` variable where `env` (resources.env.Env) has it set."""
        settings = {f.name: getattr(env, f.name) for f in fields(cls) if f.metadata["env"]}
        return replace(cls(), **{name: value for name, value in settings.items() if value is not None})

    @property
    def self_influence_configs(self) -> list[str]:
        """The configuration ids of `si_configs`, in order."""
        return [c.strip() for c in self.si_configs.split(",") if c.strip()]

    def counterfactual_steps(self, checkpoint_steps: int) -> int:
        """The counterfactual's retraining steps: `cf_train_steps`, else the checkpoint's capped at
        CF_TRAIN_STEPS_CAP."""
        return self.cf_train_steps or min(CF_TRAIN_STEPS_CAP, checkpoint_steps)
