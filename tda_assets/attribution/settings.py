"""The unlearning configuration (DESIGN §1): the one field list every layer derives from. Plain Python, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

RECIPES = ("newton", "ewc_ascent")
MASK_PADDING = ("unlearning", "losses", "both", "none")
PARAM_SUBSETS = ("all", "attention", "self_attention", "cross_attention", "cross_attention_kv")


def _field(default: object, doc: str, column: str | None = None) -> Any:
    """A settings field with its description (shown in the Dagster UI) and, when it differs, its table column."""
    return field(default=default, metadata={"doc": doc, **({"column": column} if column else {})})


@dataclass(frozen=True)
class UnlearningSettings:
    """One unlearning configuration (DESIGN §1); `lr`, `lambda_` and damping act on the mean-1 normalised Fisher.

    The one field list of a configuration: the Dagster config, the `unlearning_configs` row and the grid file
    derive from it (`settings_columns`, `settings_row`).
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

    @property
    def masks_unlearning(self) -> bool:
        return self.mask_padding in ("unlearning", "both")

    @property
    def masks_losses(self) -> bool:
        return self.mask_padding in ("losses", "both")


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
