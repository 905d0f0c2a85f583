"""The storage layout (DESIGN §3), declared once: every table and file under the storage root.

Each entry has a key pattern (`{field}` placeholders; `name={name}` folders are hive partitions), the
columns of its parquet files, and its identity: the fields that say what produced it (`checkpoint_id`,
`protocol_id`, `encoder_id`). Writers, readers, globs, skip decisions, checks and the DuckDB views
(`sql/views.sql` names tables as `{table:<name>}`) all derive from these entries; no other module spells
a storage path.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field
from typing import Any, Mapping

from tda_assets.attribution.settings import settings_columns

IDENTITY = ("checkpoint_id", "protocol_id")
_POLARS = {"str": "String", "f64": "Float64", "f32": "Float32", "i64": "Int64", "i32": "Int32", "bool": "Boolean"}
_DUCKDB = {"str": "VARCHAR", "f64": "DOUBLE", "f32": "FLOAT", "i64": "BIGINT", "i32": "INTEGER", "bool": "BOOLEAN"}


class LayoutError(ValueError):
    """A key value or a frame that does not fit the layout; the message names the entry and the fix."""


def check_value(name: str, value: object) -> str:
    """A key value that is a safe folder name (no '/', '\\', '=', no leading '.', not empty)."""
    text = str(value)
    if not text or any(c in text for c in "/\\=*?[]") or text.startswith("."):
        raise LayoutError(
            f"{name}={text!r} is not a safe folder name (no '/', '\\', '=', glob characters or leading '.')"
        )
    return text


@dataclass(frozen=True)
class Entry:
    """One table (`columns` given: parquet) or file kind of the layout."""

    name: str
    pattern: str
    columns: Mapping[str, str] = field(default_factory=dict)
    identity: tuple[str, ...] = ()
    description: str = ""
    legacy: str = ""  # the key pattern files of this entry had before the identity moved into it (io/legacy_layout.py)

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders of the key pattern, in order."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.pattern) if f)

    @property
    def partitions(self) -> tuple[str, ...]:
        """The fields that are hive folders (`name={name}`): columns of the table's view."""
        return tuple(f for f in self.fields if f"{f}={{{f}}}" in self.pattern)

    @property
    def is_table(self) -> bool:
        return bool(self.columns)

    def key(self, **values: object) -> str:
        """The key of one file, e.g. `attribution_scores/query_id=q1/config_id=c1/part-0.parquet`."""
        if set(values) != set(self.fields):
            raise LayoutError(f"{self.name}: the key takes {list(self.fields)}, got {sorted(values)}")
        return self.pattern.format(**{k: check_value(k, v) for k, v in values.items()})

    def glob(self, **fixed: object) -> str:
        """A glob over the entry's files, with some fields fixed (the others `*`)."""
        unknown = set(fixed) - set(self.fields)
        if unknown:
            raise LayoutError(f"{self.name}: no field(s) {sorted(unknown)}; fields are {list(self.fields)}")
        return self.pattern.format(**{f: check_value(f, fixed[f]) if f in fixed else "*" for f in self.fields})

    @functools.cached_property
    def _key_regex(self) -> re.Pattern[str]:
        return re.compile(
            "".join(
                re.escape(lit) + (f"(?P<{f}>[^/]+)" if f else "")
                for lit, f, _, _ in string.Formatter().parse(self.pattern)
            )
        )

    def parse(self, key: str) -> dict[str, str]:
        """The field values of a key of this entry (LayoutError if it is not one)."""
        match = self._key_regex.fullmatch(key)
        if not match:
            raise LayoutError(f"{key!r} is not a key of {self.name} ({self.pattern})")
        return match.groupdict()

    def schema(self, with_partitions: bool = False) -> dict[str, str]:
        """Column → type name (`str`, `f64`, …); partition columns (strings) first when asked."""
        cols = {p: "str" for p in self.partitions} if with_partitions else {}
        cols.update(self.columns)
        return cols

    def polars_schema(self, with_partitions: bool = False) -> dict[str, Any]:
        """The columns as a polars schema."""
        import polars as pl

        return {c: getattr(pl, _POLARS[t]) for c, t in self.schema(with_partitions).items()}

    def duckdb_read(self, root_url: str) -> str:
        """The DuckDB read of every file of the table, hive folders as VARCHAR columns, with every column of the
        schema (the empty typed relation added by name: a column no file has yet reads as NULL).

        Not `union_by_name`: it opens every file to unify schemas before the hive filter prunes, so a query on one
        `query_id` would read the footer of every query's file (tests/test_s3_storage.py guards the pruning). Files
        written before a column was added to a table are re-materialized, not unified."""
        path = f"{root_url}/{self.glob()}".replace("'", "''")
        types = ", ".join(f"'{p}': VARCHAR" for p in self.partitions)
        hive = f", hive_partitioning = true, hive_types = {{{types}}}" if self.partitions else ""
        return f"(SELECT * FROM read_parquet('{path}'{hive}) UNION ALL BY NAME {self.duckdb_empty()})"

    def duckdb_empty(self) -> str:
        """A typed relation with the table's columns and no rows (a table with no files yet)."""
        cols = ", ".join(f'CAST(NULL AS {_DUCKDB[t]}) AS "{c}"' for c, t in self.schema(with_partitions=True).items())
        return f"(SELECT {cols} WHERE false)"


PART = "part-0.parquet"
_RESULT_IDENTITY = {"checkpoint_id": "str", "protocol_id": "str"}
_KEYED = "checkpoint_id={checkpoint_id}/protocol_id={protocol_id}"  # a result's identity, first in its key (DESIGN §3)


def _result(name: str, rest: str) -> dict[str, str]:
    """The key pattern of result table `name` keyed by identity, and the pattern its files had before (`legacy`)."""
    return {"pattern": f"{name}/{_KEYED}/{rest}{PART}", "legacy": f"{name}/{rest}{PART}"}


def _unlearning_config_columns() -> dict[str, str]:
    types = {"float": "f64", "int": "i64", "str": "str", "bool": "bool"}
    return {col: types[t.removesuffix(" | None")] for col, t in settings_columns().items()}


_ENTRIES = [
    # training side
    Entry(
        "training_manifest",
        f"training_manifest/{PART}",
        {"item_id": "str", "audio_uri": "str", "caption": "str", "artist": "str", "duration_s": "f64", "shard": "str"},
        description="one row per training item",
    ),
    Entry(
        "manifest_origin",
        "training_manifest/origin.json",
        description="the manifest the root was prepared from (`manifest_uri`, null for the embedded corpus): its "
        "folder is an allowed root of query clips",
    ),
    Entry("corpus_audio", "corpus/{artist}/{item_id}.wav", description="the embedded corpus's clips"),
    Entry(
        "training_features",
        "training_features/encoder_id={encoder_id}/shard={shard}/features.safetensors",
        identity=("encoder_id",),
        description="latents, frame masks and conditioning of one shard",
    ),
    Entry("checkpoint_record", "checkpoint/current.json", description="the current checkpoint (a CheckpointRecord)"),
    Entry(
        "checkpoint_folder",
        "checkpoint/{checkpoint_id}",
        identity=("checkpoint_id",),
        description="a trained model folder (diffusers layout)",
    ),
    Entry(
        "fisher_diagonal",
        "fisher_diagonal/checkpoint_id={checkpoint_id}/protocol_id={protocol_id}/fisher.safetensors",
        identity=IDENTITY,
        description="the diagonal Fisher",
    ),
    Entry(
        "training_gradients",
        "training_gradients/checkpoint_id={checkpoint_id}/protocol_id={protocol_id}/gradient_id={gradient_id}"
        "/shard={shard}/gradients.safetensors",
        identity=(*IDENTITY, "gradient_id"),
        description="sketched, Fisher-preconditioned per-item gradients of one shard (gradient_id: subset, loss "
        "masking, sketch k and seed, damping)",
    ),
    Entry(
        "baseline_losses",
        f"baseline_losses/checkpoint_id={{checkpoint_id}}/protocol_id={{protocol_id}}/shard={{shard}}/{PART}",
        {"item_id": "str", "draw": "i32", "t": "f32", "loss": "f32", "loss_masked": "f32", "features_digest": "str"},
        identity=IDENTITY,
        description="L0_ik for every item and draw of one shard (features_digest: of the shard's "
        "training_features they were measured on)",
    ),
    Entry(
        "training_embeddings",
        "training_embeddings/checkpoint_id={checkpoint_id}/protocol_id={protocol_id}/encoder_id={encoder_id}/shard={shard}"
        "/embeddings.safetensors",
        identity=(*IDENTITY, "encoder_id"),
        description="item ids and the audio, text and internal (denoiser at the protocol's shared draws) embeddings "
        "of one shard",
    ),
    # queries
    Entry("inbox", "inbox/{name}", description="query files (`<query_id>.txt` or `.json`)"),
    Entry(
        "query_batch",
        "inbox_batches/{batch_id}.json",
        description="the sorted query ids of one `query_batches` partition (written by the inbox sensor)",
    ),
    Entry(
        "upload",
        "uploads/{name}",
        description="a user's clip copied into the storage root by `tda attribute/add-query --audio`",
    ),
    Entry(
        "queries",
        f"queries/query_id={{query_id}}/{PART}",
        {
            "prompt": "str",
            "seed": "i64",
            "audio_uri": "str",
            "target_artist": "str",
            "encoder_id": "str",
            "generated_by": "str",
            "source_rate": "i64",
            "source_channels": "i64",
            "seconds": "f64",
            "windows": "i64",
        },
        identity=("encoder_id",),
        description="one row per query (a user's clip: its rate, channels, length and windows)",
    ),
    Entry("query_audio", "query_clips/query_id={query_id}/clip.wav", description="a generated query clip"),
    Entry(
        "query_features",
        "query_clips/query_id={query_id}/features.safetensors",
        identity=("encoder_id",),
        description="the query's latent, frame mask and conditioning",
    ),
    Entry(
        "unlearning_configs",
        f"unlearning_configs/config_id={{config_id}}/{PART}",
        _unlearning_config_columns(),
        description="one row per unlearning configuration",
    ),
    Entry(
        "unlearned_delta",
        "unlearned_model/checkpoint_id={checkpoint_id}/protocol_id={protocol_id}/query_id={query_id}/config_id={config_id}"
        "/delta.safetensors",
        identity=IDENTITY,
        description="the unlearned model as a weight delta",
    ),
    Entry(
        "unlearning_runs",
        columns={
            "query_loss_before": "f64",
            "query_loss_after": "f64",
            "delta_uri": "str",
            "seconds": "f64",
            "lr_used": "f64",
            "target_ratio": "f64",
            "search_ratio": "f64",
            "probes": "i64",
        },
        identity=IDENTITY,
        **_result("unlearning_runs", "query_id={query_id}/config_id={config_id}/"),
        description="query loss before/after unlearning",
    ),
    Entry(
        "unlearned_losses",
        f"unlearned_losses/checkpoint_id={{checkpoint_id}}/protocol_id={{protocol_id}}/query_id={{query_id}}"
        f"/config_id={{config_id}}/{PART}",
        {"item_id": "str", "draw": "i32", "loss": "f32", "loss_masked": "f32"},
        identity=IDENTITY,
        description="the unlearned model's loss on every item and draw",
    ),
    Entry(
        "attribution_scores",
        columns={
            "method": "str",
            "item_id": "str",
            "score": "f64",
            "rank": "i64",
            "mean_delta": "f64",
            "relative_score": "f64",
            "skew_score": "f64",
            "share": "f64",
            "score_type": "str",
            "rescored": "bool",
            "draws_used": "i64",
        },
        identity=IDENTITY,
        **_result("attribution_scores", "query_id={query_id}/config_id={config_id}/"),
        description="unlearning attribution (score = the configuration's score_type; mean_delta always kept); method "
        "`unlearning` or `linearized`; `rescored`/`draws_used`: whether and on how many draws the item was "
        "rescored exactly (two_stage leaves most items unrescored: score null, ranked last)",
    ),
    Entry(
        "similarity_scores",
        f"similarity_scores/query_id={{query_id}}/method={{method}}/{PART}",
        {"item_id": "str", "score": "f64", "rank": "i64", "share": "f64", **_RESULT_IDENTITY},
        identity=IDENTITY,
        description="similarity attribution",
    ),
    Entry(
        "near_copies",
        _result("near_copies", "query_id={query_id}/")["pattern"],  # a new table: no legacy layout
        {
            "segment": "str",
            "segment_start_s": "f64",
            "segment_end_s": "f64",
            "near_copy": "bool",
            "copy_of": "str",
            "copy_score": "f64",
            "margin": "f64",
            "signal": "str",
        },
        identity=IDENTITY,
        description="the near-copy verdict of each query: one row for the whole clip (`segment` clip, scored as its "
        "similarity rows are) and, for a clip longer than the model's window, one per window (`segment` window, its "
        "seconds, scored alone)",
    ),
    # reports
    Entry(
        "consistency",
        columns={"query_id": "str", "left": "str", "right": "str", "metric": "str", "k": "i64", "value": "f64"},
        identity=IDENTITY,
        **_result("consistency", ""),
        description="pairwise agreement of rankings",
    ),
    Entry(
        "counterfactual",
        **_result("counterfactual", ""),
        columns={
            "query_id": "str",
            "removal": "str",
            "removal_seed": "i64",
            "k": "i64",
            "query_loss_full": "f64",
            "query_loss_removed": "f64",
            "loss_rise": "f64",
            "relative_rise": "f64",
            "removed_of_target_artist": "i64",
            "removed_items": "str",
            "config_id": "str",
            "train_steps": "i64",
            "full_model": "str",
            "query_draws": "i64",
            "random_rise_mean": "f64",
            "random_rise_sd": "f64",
            "noise_floor": "f64",
            "floor_sds": "f64",
            "passed": "bool",
            "same_artist_rise": "f64",
            "item_floor": "f64",
            "passed_item_level": "bool",
        },
        identity=IDENTITY,
        description="retraining without the top-k vs k random items (shared by every query) and k "
        "items of the query's target artist outside its top-k (`removal`); the query's "
        "verdicts against both on each of its rows",
    ),
    Entry(
        "self_influence",
        **_result("self_influence", "config_id={config_id}/"),
        columns={
            "target_item_id": "str",
            "rank": "i64",
            "score": "f64",
            "loss_ratio": "f64",
            "lr_used": "f64",
            "score_type": "str",
            "top_k_similarity": "f64",
            "bottom_k_similarity": "f64",
            "others_median_relative_change": "f64",
            "target_set": "str",
        },
        identity=IDENTITY,
        description="training items unlearned as their own queries: the rank of the item itself (`target_set`: "
        "development or reporting; a file holds both, a run replaces its own set)",
    ),
    Entry(
        "replication",
        **_result("replication", "config_id={config_id}/"),
        columns={
            "source_item_id": "str",
            "transform": "str",
            "rank": "i64",
            "score": "f64",
            "loss_ratio": "f64",
            "target_set": "str",
            "snr_db": "f64",
            "latent_change": "f64",
        },
        identity=IDENTITY,
        description="a training item's transformed audio as a query: its rank; `snr_db` of the "
        "transformed audio against the source in the model's band, `latent_change` "
        "the relative RMS change of its latents",
    ),
    Entry(
        "near_copy_calibration",
        _result("near_copy_calibration", "")["pattern"],  # a new table: no legacy layout
        {
            "target_set": "str",
            "kind": "str",
            "query_id": "str",
            "source_item_id": "str",
            "artist": "str",
            "transform": "str",
            "snr_db": "f64",
            "near_copy": "bool",
            "copy_of": "str",
            "copy_score": "f64",
            "margin": "f64",
            "signal": "str",
            "correct": "bool",
        },
        identity=IDENTITY,
        description="the near-copy rule on known answers: `kind` copy (a training item's audio after `transform`, "
        "its `snr_db` in the model's band) or heldout / generated (non-copies); `correct`: a copy flagged as a copy "
        "of its own recording, a non-copy not flagged; `target_set` development (chose the threshold) or reporting",
    ),
    Entry("plot", "plots/{kind}/{name}.png", description="a report's picture"),
    Entry(
        "plot_top_k", "plots/top_k/{query_id}/{config_id}.png", description="top-k bars of a query and configuration"
    ),
]

LAYOUT: dict[str, Entry] = {e.name: e for e in _ENTRIES}
TABLES: dict[str, Entry] = {e.name: e for e in _ENTRIES if e.is_table}


def entry(name: str, /) -> Entry:
    """The layout entry called `name` (LayoutError naming the known ones)."""
    try:
        return LAYOUT[name]
    except KeyError:
        raise LayoutError(f"no table or file {name!r} in the layout; known: {', '.join(LAYOUT)}") from None


def key(name: str, /, **values: object) -> str:
    """The key of one file of entry `name`."""
    return entry(name).key(**values)


def glob(name: str, /, **fixed: object) -> str:
    """A glob over the files of entry `name`, some fields fixed."""
    return entry(name).glob(**fixed)
