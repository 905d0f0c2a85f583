"""Storage on a local root: atomic writes, round trips, partitions, globs, errors."""

from __future__ import annotations

import os

import polars as pl
import pytest
import torch

from tda_assets.io.registry import TABLES, LayoutError
from tda_assets.io.storage import Storage, StorageError
from tda_assets.io.tables import read_tables, write_table

ID = {"checkpoint_id": "c", "protocol_id": "p"}  # a result's identity, first in its key
KEY = "attribution_scores/checkpoint_id=c/protocol_id=p/query_id=q1/config_id=default/part-0.parquet"


def scores(n: int = 3, offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "method": ["unlearning"] * n,
            "item_id": [f"i{i}" for i in range(n)],
            "score": [offset + i for i in range(n)],
            "rank": list(range(n, 0, -1)),
            "relative_score": [0.1] * n,
            "skew_score": [0.2] * n,
            "share": [1.0 / n] * n,
            "mean_delta": [offset + i for i in range(n)],
            "score_type": ["mean_delta"] * n,
            "checkpoint_id": ["c"] * n,
            "protocol_id": ["p"] * n,
            "rescored": [True] * n,
            "draws_used": [16] * n,
        }
    )


def all_files(root_dir) -> list[str]:
    return sorted(str(p.relative_to(root_dir)) for p in root_dir.rglob("*") if p.is_file())


@pytest.fixture
def root(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


def test_atomic_write_leaves_no_temp_file(root, tmp_path):
    root.write_parquet(KEY, scores())
    assert all_files(tmp_path / "root") == [KEY]


def test_crash_during_serialization_keeps_the_old_file(root, tmp_path):
    root.write_parquet(KEY, scores(offset=0.0))

    class CrashingFrame:
        def write_parquet(self, buf):
            buf.write(b"PAR1 half a file")
            raise RuntimeError("killed while serializing")

    with pytest.raises(RuntimeError, match="killed"):
        root.write_parquet(KEY, CrashingFrame())  # type: ignore[arg-type]
    assert root.read_parquet(KEY).equals(scores(offset=0.0))
    assert all_files(tmp_path / "root") == [KEY]


def test_crash_before_rename_keeps_the_old_file(root, tmp_path, monkeypatch):
    root.write_parquet(KEY, scores(offset=0.0))

    def crash(src, dst):
        assert os.path.basename(src).startswith(".") and src.endswith(".tmp")  # hidden temp name in the same folder
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="killed before the rename"):
        root.write_parquet(KEY, scores(offset=10.0))
    monkeypatch.undo()
    assert root.read_parquet(KEY).equals(scores(offset=0.0))
    assert all_files(tmp_path / "root") == [KEY]


def test_parquet_round_trip_keeps_types(root):
    df = pl.DataFrame(
        {"q": ["0012"], "k": [None], "draw": [3], "loss": [0.5]},
        schema_overrides={"draw": pl.Int32, "loss": pl.Float32},
    )
    root.write_parquet("t/part-0.parquet", df)
    assert root.read_parquet("t/part-0.parquet").equals(df)


def test_safetensors_round_trip_with_metadata(root):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    uri = root.write_tensors("deltas/q1/default.safetensors", tensors, metadata={"param_subset": "all"})
    got, meta = root.read_tensors("deltas/q1/default.safetensors")
    assert uri == root.local_path("deltas/q1/default.safetensors")
    assert meta == {"param_subset": "all"}
    assert set(got) == {"w", "b"} and torch.equal(got["w"], tensors["w"]) and torch.equal(got["b"], tensors["b"])
    assert root.read_tensors_metadata("deltas/q1/default.safetensors") == {"param_subset": "all"}  # the header only


def test_one_tensor_is_read_alone_with_the_metadata(root):
    tensors = {
        "rows": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "norms": torch.tensor([0.5, 2.0], dtype=torch.float64),
        "empty": torch.zeros(0),
    }
    root.write_tensors("g/shard.safetensors", tensors, metadata={"k": "3"})
    norms, meta = root.read_tensor("g/shard.safetensors", "norms")
    assert norms.dtype == torch.float64 and norms.tolist() == [0.5, 2.0] and meta == {"k": "3"}
    assert torch.equal(root.read_tensor("g/shard.safetensors", "rows")[0], tensors["rows"])
    assert root.read_tensor("g/shard.safetensors", "empty")[0].shape == (0,)
    assert root.read_tensor("g/shard.safetensors", "absent") == (None, {"k": "3"})


def test_rewriting_one_partition_leaves_the_others_untouched(root):
    write_table(root, "attribution_scores", scores(offset=0.0), **ID, query_id="q1", config_id="default")
    write_table(root, "attribution_scores", scores(offset=5.0), **ID, query_id="q2", config_id="default")
    q2_key = TABLES["attribution_scores"].key(**ID, query_id="q2", config_id="default")
    q2_before = root.read_bytes(q2_key)
    write_table(root, "attribution_scores", scores(offset=100.0), **ID, query_id="q1", config_id="default")
    assert root.read_bytes(q2_key) == q2_before
    assert root.read_parquet(KEY)["score"].to_list() == [100.0, 101.0, 102.0]


def test_glob_ignores_temp_files_of_killed_writes(root, tmp_path):
    root.write_parquet(KEY, scores())
    folder = tmp_path / "root" / os.path.dirname(KEY)
    (folder / ".part-0.parquet.0123abcd.tmp").write_bytes(b"half")  # a write killed before its rename
    assert root.glob("attribution_scores/*/*/*/*/*") == [KEY]
    assert root.read_parquet("attribution_scores/*/*/*/*/part-*.parquet").height == 3


def test_read_of_a_missing_key_names_it(root):
    with pytest.raises(StorageError, match="queries/query_id=nope/part-0.parquet"):
        root.read_parquet("queries/query_id=nope/part-0.parquet")


def test_read_of_an_empty_glob_names_it(root):
    with pytest.raises(StorageError, match=r"no parquet file matches .*queries/\*/part-\*\.parquet"):
        root.read_parquet("queries/*/part-*.parquet")


def test_table_read_adds_partition_columns_as_strings(root):
    write_table(root, "attribution_scores", scores(), **ID, query_id="0012", config_id="default")
    df = read_tables(root, "attribution_scores")
    assert df["query_id"].dtype == pl.String and set(df["query_id"]) == {"0012"}


def test_write_table_casts_and_drops_partition_columns(root):
    df = scores().with_columns(pl.col("rank").cast(pl.Int32), pl.lit("q1").alias("query_id"))
    write_table(root, "attribution_scores", df, **ID, query_id="q1", config_id="default")
    got = root.read_parquet(KEY)
    assert "query_id" not in got.columns and got.schema["rank"] == pl.Int64


def test_write_table_refuses_missing_columns_and_unsafe_partition_values(root):
    with pytest.raises(LayoutError, match=r"lacks column\(s\) \['score'\]"):
        write_table(root, "attribution_scores", scores().drop("score"), **ID, query_id="q1", config_id="default")
    with pytest.raises(LayoutError, match="not a safe folder name"):
        write_table(root, "attribution_scores", scores(), **ID, query_id="a/b", config_id="default")


def test_keys_outside_the_root_are_refused(root):
    with pytest.raises(StorageError, match="relative to the root"):
        root.write_bytes("../escape.txt", b"x")


def test_put_dir_and_get_dir_round_trip(root, tmp_path):
    src = tmp_path / "model"
    (src / "transformer").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "transformer" / "weights.safetensors").write_bytes(b"\x00\x01")
    root.put_dir(src, "checkpoints/embedded")
    out = root.get_dir("checkpoints/embedded", tmp_path / "copy")
    assert all_files(out) == ["model_index.json", "transformer/weights.safetensors"]
    assert (out / "transformer" / "weights.safetensors").read_bytes() == b"\x00\x01"


def test_get_dir_refuses_a_folder_without_success_marker(root):
    root.write_bytes("checkpoints/half/model_index.json", b"{}")
    with pytest.raises(StorageError, match="_SUCCESS"):
        root.get_dir("checkpoints/half", "/tmp/unused")


def test_file_url_and_plain_path_are_the_same_root(tmp_path):
    a, b = Storage(f"file://{tmp_path}"), Storage(str(tmp_path))
    assert a.protocol == b.protocol == "file" and a.uri("x", "y") == b.uri("x", "y") == f"{tmp_path}/x/y"


def test_a_root_with_glob_characters_is_refused(tmp_path):
    with pytest.raises(StorageError, match="glob character"):
        Storage(str(tmp_path / "runs[1]"))


def test_check_creates_a_writable_local_root(root, tmp_path):
    root.check()
    assert (tmp_path / "root").is_dir() and all_files(tmp_path / "root") == []


def test_delete_recursive_removes_a_folder(root):
    root.write_bytes("a/b/c.txt", b"x")
    root.delete("a", recursive=True)
    assert not root.exists("a/b/c.txt") and root.glob("a/**") == []


def test_cached_copy_is_reused_for_the_same_stamp_and_fetched_again_for_a_new_one(tmp_path):
    root = Storage(str(tmp_path / "root"))
    root.write_bytes("models/m/config.json", b"v1")
    local = tmp_path / "cache" / "m"
    assert root.cached_copy("models/m", local, b"upload-1", require_marker=False) == local
    root.write_bytes("models/m/config.json", b"v2")
    root.cached_copy("models/m", local, b"upload-1", require_marker=False)
    assert (local / "config.json").read_bytes() == b"v1"  # same stamp: the copy is kept
    root.cached_copy("models/m", local, b"upload-2", require_marker=False)
    assert (local / "config.json").read_bytes() == b"v2"
    assert [p.name for p in local.parent.iterdir()] == ["m"]  # no temporary folder left beside it
