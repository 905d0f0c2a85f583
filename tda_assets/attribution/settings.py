"""The unlearning configuration (DESIGN §1): the one field list every layer derives from. Plain Python, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

RECIPES = ("newton", "ewc_ascent")
MASK_PADDING = ("unlearning", "losses", "both", "none")
PARAM_SUBSETS = ("all", "attention", "self_attention", "cross_attention", "cross_attention_kv")
SCORE_TYPES = ("mean_delta", "relative", "skew")  # which score ranks the items (scores.ranking_score)


def _field(default: object, doc: str, column: str | None = None) -> Any:
    """A settings field with its description (shown in the Dagster UI) and, when it differs, its table column."""
    return field(default=default, metadata={"doc": doc, **({"column": column} if column else {})})


@dataclass(frozen=True)
class UnlearningSettings:
    """One unlearning configuration (DESIGN §1); `lr`, `lambda_` and damping act on the mean-1 normalised Fisher.

    The one field list of a configuration: the Dagster config, the `unlearning_configs` row and the grid file
    derive from it (`settings_columns`, `settings_row`).

    The defaults are the configuration the self-influence protocol chose on the embedded default (`tda evaluate`,
    2026-11-26: mean self-rank 1.33 against 2.33 for a fixed lr 250 ranked by mean ΔL): one Newton step sized per
    query to raise its loss ×1.1, items ranked by the skew score.

    `target_ratio` (newton, one step only) replaces the fixed `lr` by a per-query search within `lr_min`…`lr_max`
    for the lr whose query-loss ratio lands in `ratio_band()`: the target ± `ratio_tolerance` × its excess
    over 1 (target 1.3, tolerance 0.1 → 1.27–1.33). The search starts at `lr`. `score_type` names the score
    that ranks the items (`scores.ranking_score`).
    """

    recipe: str = _field("newton", "'newton' (Fisher-preconditioned step) or 'ewc_ascent' (penalised gradient ascent)")
    lr: float = _field(250.0, "step size (newton: scales (lr/N)·F⁻¹g; ewc_ascent: the optimizer's learning rate)")
    steps: int = _field(1, "optimizer or Newton steps")
    lambda_: float = _field(1.0, "EWC penalty weight λ (ewc_ascent)", column="lambda")
    param_subset: str = _field("all", f"parameters unlearning may change: {', '.join(PARAM_SUBSETS)}")
    optimizer: str = _field("adam", "'adam' or 'sgd' (ewc_ascent)")
    seed: int = _field(0, "seed of the query's random (t, ε) copies during unlearning")
    query_draws: int = _field(64, "random (t, ε) copies of the query per step")
    damping: float = _field(0.1, "added to the normalised Fisher before inverting (newton)")
    mask_padding: str = _field("unlearning", f"where padded frames are excluded: {', '.join(MASK_PADDING)}")
    score_type: str = _field("skew", f"the score that ranks the items: {', '.join(SCORE_TYPES)}")
    target_ratio: float | None = _field(1.1, "newton only: choose the step size per query so that the query loss "
                                             "rises by this factor (None: the fixed lr)")
    ratio_tolerance: float = _field(0.1, "accepted band around target_ratio, as a share of target_ratio − 1")
    lr_min: float = _field(1e-2, "smallest step size the target_ratio search tries")
    lr_max: float = _field(1e6, "largest step size the target_ratio search tries")

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: choose one of {RECIPES}")
        if self.mask_padding not in MASK_PADDING:
            raise ValueError(f"unknown mask_padding {self.mask_padding!r}: choose one of {MASK_PADDING}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose 'adam' or 'sgd'")
        if self.param_subset not in PARAM_SUBSETS:
            raise ValueError(f"unknown param_subset {self.param_subset!r}: choose one of {', '.join(PARAM_SUBSETS)}")
        if self.steps < 1 or self.query_draws < 1:
            raise ValueError("steps and query_draws must be at least 1")
        if self.score_type not in SCORE_TYPES:
            raise ValueError(f"unknown score_type {self.score_type!r}: choose one of {SCORE_TYPES}")
        if not 0 < self.ratio_tolerance < 1:
            raise ValueError(f"ratio_tolerance {self.ratio_tolerance} must be in (0, 1): a share of target_ratio − 1")
        if not 0 < self.lr_min < self.lr_max:
            raise ValueError(f"lr_min {self.lr_min} and lr_max {self.lr_max} must satisfy 0 < lr_min < lr_max")
        if self.target_ratio is not None:
            if not self.target_ratio > 1:
                raise ValueError(f"target_ratio {self.target_ratio} must be > 1 (it is the rise ℓ_q(θ_u)/ℓ_q(θ0)), "
                                 "or None for a fixed lr")
            if self.recipe != "newton" or self.steps != 1:
                raise ValueError(f"target_ratio {self.target_ratio} needs recipe 'newton' with steps=1 "
                                 f"(got {self.recipe!r}, steps={self.steps}): set target_ratio: null for a fixed lr")

    @property
    def masks_unlearning(self) -> bool:
        return self.mask_padding in ("unlearning", "both")

    @property
    def masks_losses(self) -> bool:
        return self.mask_padding in ("losses", "both")

    def ratio_band(self) -> tuple[float, float]:
        """The query-loss ratios a `target_ratio` search accepts: target ± ratio_tolerance·(target − 1)."""
        if self.target_ratio is None:
            raise ValueError("ratio_band needs a target_ratio")
        half = self.ratio_tolerance * (self.target_ratio - 1)
        return self.target_ratio - half, self.target_ratio + half


def settings_columns() -> dict[str, str]:
    """Table column → type name (`float`, `int`, `str`) of every settings field (`lambda_` is the column `lambda`)."""
    return {f.metadata.get("column", f.name): str(f.type) for f in fields(UnlearningSettings)}


def settings_row(settings: UnlearningSettings) -> dict[str, object]:
    """The settings as one table row, by column name."""
    return {f.metadata.get("column", f.name): getattr(settings, f.name) for f in fields(UnlearningSettings)}


def settings_from_row(row: dict[str, object]) -> UnlearningSettings:
    """Settings from a row keyed by column or field name (unknown keys: ValueError naming them and the fields)."""
    by_column = {f.metadata.get("column", f.name): f.name for f in fields(UnlearningSettings)}
    names = {f.name for f in fields(UnlearningSettings)}
    unknown = sorted(k for k in row if k not in by_column and k not in names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: the fields are {', '.join(by_column)}")
    return UnlearningSettings(**{by_column.get(k, k): v for k, v in row.items()})
