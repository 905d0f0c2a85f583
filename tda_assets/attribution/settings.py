"""The unlearning configuration (DESIGN §1): the one field list every layer derives from. Plain Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

RECIPES = ("newton", "ewc_ascent")
MASK_PADDING = ("unlearning", "losses", "both", "none")
PARAM_SUBSETS = ("all", "attention", "self_attention", "cross_attention", "cross_attention_kv")
SCORE_TYPES = ("mean_delta", "relative", "skew", "normalized")  # which score ranks the items (scores.ranking_score)
METHODS = ("unlearning", "linearized")  # exact rescore of the unlearned model, or its first-order estimate (DESIGN §1)
STAGES = ("full", "two_stage")  # rescore every item at every draw, or the cheap signals' candidates (multi-fidelity)
TWO_STAGE_KNOBS = ("candidates", "max_candidates", "first_draws", "keep", "min_keep")
# DESIGN §1: an unlearning whose query-loss ratio on the protocol draws is below this gives no attribution, in every
# path (the query_loss_raised check, the grid, attribute_exact, self-influence, replication): it is recorded as failed
MIN_QUERY_LOSS_RATIO = 1.05


def query_loss_ratio(after: Any, before: Any) -> Any:
    """The query-loss ratio of an unlearning, after / before: of floats, or of polars columns (`pl.col`)."""
    return after / before


# DESIGN §1 (Scores): the normalized score divides by max(‖P g_i‖, NORM_FLOOR × median norm), so an item whose gradient
# is near zero cannot be lifted by the division alone. Chosen on the development targets (choose_targets(16, seed 0)) of
# the tests' corpus model (tests/benchmarks/bench_norm_floor.py): the largest fraction that keeps every target first
# (16/16 at 0–0.5, 15/16 at 0.75 and 1.0); there the norms span 0.47–2.3× their median, so it floors only the lowest
# items, and guards a model whose smallest norms lie far below the median
NORM_FLOOR = 0.5


def count_of(size: int | float, n: int) -> int:
    """A count given as an int, or as a fraction (float ≤ 1) of `n` rounded up; at least 1, at most `n`."""
    m = int(math.ceil(size * n)) if isinstance(size, float) else int(size)
    return max(1, min(n, m))


def _field(default: object, doc: str, column: str | None = None) -> Any:
    """A settings field with its description (shown in the Dagster UI) and, when it differs, its table column."""
    return field(default=default, metadata={"doc": doc, **({"column": column} if column else {})})


@dataclass(frozen=True)
class UnlearningSettings:
    """One unlearning configuration (DESIGN §1); `lr`, `lambda_` and damping act on the mean-1 normalized Fisher.

    The one field list of a configuration: the Dagster config, the `unlearning_configs` row and the grid file
    derive from it (`settings_columns`, `settings_row`).

    The defaults are the configuration the self-influence protocol chose on the embedded default: one Newton step
    sized per query to raise its loss ×1.1, items ranked by the normalized score (mean ΔL over the item's gradient
    norm in the step's metric, read from the training_gradients store, floored at NORM_FLOOR × the median norm). On 16
    k-means targets of the embedded default (2026-11-26, before the floor) it ranked 15 first (R 1.12) against 12
    (R 1.38) for the skew score and 11 (R 1.56) for mean ΔL.

    `method` and `stage` choose the scoring path (DESIGN §1): the exact rescore of every item (`unlearning`, `full`,
    the default), the exact rescore of the cheap signals' candidates only (`two_stage`, with `candidates`,
    `first_draws`, `keep`, `min_keep`), or the first-order estimate from the stored training gradients
    (`linearized`; `sketch_k` and `sketch_seed` name the store, with the subset, loss masking and damping).

    `target_ratio` (newton, one step only) replaces the fixed `lr` by a per-query search within `lr_min`…`lr_max`
    for the lr whose query-loss ratio lands in `ratio_band()`: the target ± `ratio_tolerance` × its excess
    over 1 (target 1.3, tolerance 0.1 → 1.27–1.33). The search starts at `lr`. `score_type` names the score
    that ranks the items (`scores.ranking_score`).
    """

    recipe: str = _field("newton", "'newton' (Fisher-preconditioned step) or 'ewc_ascent' (penalized gradient ascent)")
    lr: float = _field(250.0, "step size (newton: scales (lr/N)·F⁻¹g; ewc_ascent: the optimizer's learning rate)")
    steps: int = _field(1, "optimizer or Newton steps")
    lambda_: float = _field(1.0, "EWC penalty weight λ (ewc_ascent)", column="lambda")
    param_subset: str = _field("all", f"parameters unlearning may change: {', '.join(PARAM_SUBSETS)}")
    optimizer: str = _field("adam", "'adam' or 'sgd' (ewc_ascent)")
    seed: int = _field(0, "seed of the query's random (t, ε) copies during unlearning")
    query_draws: int = _field(64, "random (t, ε) copies of the query per step")
    damping: float = _field(0.1, "added to the normalized Fisher before inverting (newton)")
    mask_padding: str = _field("unlearning", f"where padded frames are excluded: {', '.join(MASK_PADDING)}")
    score_type: str = _field(
        "normalized",
        f"the score that ranks the items: {', '.join(SCORE_TYPES)} (normalized "
        "reads the items' gradient norms from the training_gradients store)",
    )
    target_ratio: float | None = _field(
        1.1,
        "newton only: choose the step size per query so that the query loss rises by this factor (None: the fixed lr)",
    )
    ratio_tolerance: float = _field(0.1, "accepted band around target_ratio, as a share of target_ratio − 1")
    lr_min: float = _field(1e-2, "smallest step size the target_ratio search tries")
    lr_max: float = _field(1e6, "largest step size the target_ratio search tries")
    method: str = _field(
        "unlearning",
        "'unlearning' (exact rescore of every item under the unlearned model) or "
        "'linearized' (first-order g_iᵀδ from the stored training_gradients)",
    )
    stage: str = _field(
        "full",
        "'full' (every item, every draw) or 'two_stage' (only the cheap signals' candidates, "
        "with successive halving over draws; method unlearning only)",
    )
    candidates: float = _field(
        0.15,
        "two_stage: items taken from the top of each cheap signal (internal and audio "
        "similarity, linearized when its gradients exist): a fraction of the items (≤ 1) "
        "or a count (> 1)",
    )
    # make bench-10k (N = 10,000, K = 8, 4 queries): the smallest count per signal whose top-10 Jaccard with the full
    # rescore reached 0.9 (0.92, at 5.6% of its item-draws; 256: 0.79). Past N = 3,414 it is what `candidates` gives
    max_candidates: int | None = _field(
        512, "two_stage: at most this many items from each cheap signal, whatever `candidates` gives (None: no cap)"
    )
    first_draws: int | None = _field(
        None, "two_stage: protocol draws every candidate gets first (None: K/4; ≥ K: no halving)"
    )
    keep: float = _field(
        0.5, "two_stage: candidates that get all K draws, by their first-draws score: a fraction (≤ 1) or a count (> 1)"
    )
    min_keep: int = _field(10, "two_stage: at least this many candidates get all K draws (the headline top-k)")
    sketch_k: int = _field(
        4096, "the training_gradients store used (linearized method, two_stage signal): its CountSketch dimension"
    )
    sketch_seed: int = _field(0, "the training_gradients store used: its CountSketch seed")

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
                raise ValueError(
                    f"target_ratio {self.target_ratio} must be > 1 (it is the rise ℓ_q(θ_u)/ℓ_q(θ0)), "
                    "or None for a fixed lr"
                )
            if self.recipe != "newton" or self.steps != 1:
                raise ValueError(
                    f"target_ratio {self.target_ratio} needs recipe 'newton' with steps=1 "
                    f"(got {self.recipe!r}, steps={self.steps}): set target_ratio: null for a fixed lr"
                )
        self._check_fast_paths()

    def _check_fast_paths(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}: choose one of {STAGES}")
        if self.stage == "two_stage" and self.method != "unlearning":
            raise ValueError(
                f"stage 'two_stage' rescores candidates exactly, so it needs method 'unlearning' (got "
                f"{self.method!r}): use stage 'full' with method {self.method!r}"
            )
        if self.method == "linearized" and self.score_type == "skew":
            raise ValueError(
                "score_type 'skew' needs the unlearned losses, which method 'linearized' never computes: "
                "use score_type 'mean_delta' or 'relative'"
            )
        if self.stage == "full":
            changed = [f.name for f in fields(self) if f.name in TWO_STAGE_KNOBS and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} only act with stage 'two_stage': set stage: two_stage, or drop them"
                )
        for name in ("candidates", "keep"):
            value = getattr(self, name)
            if not value > 0 or (value > 1 and value != int(value)):
                raise ValueError(f"{name} {value} must be a fraction of the items in (0, 1] or a whole count > 1")
        if self.first_draws is not None and self.first_draws < 1:
            raise ValueError(f"first_draws {self.first_draws} must be at least 1, or None for K/4")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates {self.max_candidates} must be at least 1, or None for no cap")
        if self.min_keep < 1 or self.sketch_k < 1:
            raise ValueError(f"min_keep ({self.min_keep}) and sketch_k ({self.sketch_k}) must be at least 1")

    @property
    def needs_exact_rescore(self) -> bool:
        """Whether unlearned_losses rescores items (every one, or the two_stage candidates): not for `linearized`."""
        return self.method == "unlearning"

    @property
    def needs_gradients(self) -> bool:
        """Whether scoring reads the training_gradients store: `linearized` scores from it, `normalized` divides by
        its item norms."""
        return self.method == "linearized" or self.score_type == "normalized"

    @property
    def is_full_exact(self) -> bool:
        """Every item rescored at every draw: what self-influence and replication judge."""
        return self.method == "unlearning" and self.stage == "full"

    @staticmethod
    def count_or_fraction(value: float) -> int | float:
        """A `candidates`/`keep` value as the engine takes it: a fraction (float ≤ 1) or a count (int)."""
        return float(value) if value <= 1 else int(value)

    def candidates_per_signal(self, n_items: int) -> int:
        """How many items two_stage takes from the top of each cheap signal among `n_items`: `candidates` (a fraction
        of the items, or a count), at most `max_candidates`, at least 1 and at most `n_items`."""
        count = count_of(self.count_or_fraction(self.candidates), n_items)
        return count if self.max_candidates is None else min(count, self.max_candidates)

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
