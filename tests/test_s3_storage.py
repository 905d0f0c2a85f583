"""Storage and the DuckDB views on S3 (moto's standalone server), and the S3 errors users can fix."""

from __future__ import annotations

import socket

import polars as pl
import pytest
import torch

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage, StorageError
from tda_assets.io.tables import write_table
from tests.test_query_engine import write_tiny_dataset

KEY = "queries/query_id=0012/part-0.parquet"
QUERY = pl.DataFrame(
    {
        "prompt": ["a waltz"],
        "seed": [7],
        "audio_uri": ["q.wav"],
        "target_artist": ["A"],
        "encoder_id": ["e"],
        "generated_by": ["c"],
        "source_rate": [16000],
        "source_channels": [1],
        "seconds": [4.096],
        "windows": [1],
    }
)


def test_s3_root_honours_aws_endpoint_url(s3_root):
    root = Storage(s3_root)
    assert root.protocol == "s3" and root.endpoint_url.startswith("http://127.0.0.1:")
    root.check()


def test_parquet_and_tensors_round_trip(s3_root):
    root = Storage(s3_root)
    assert root.write_parquet(KEY, QUERY) == f"{s3_root}/{KEY}"
    assert root.read_parquet(KEY).equals(QUERY)
    root.write_tensors("deltas/q.safetensors", {"w": torch.ones(2, 2)}, metadata={"config_id": "default"})
    tensors, meta = root.read_tensors("deltas/q.safetensors")
    assert torch.equal(tensors["w"], torch.ones(2, 2)) and meta == {"config_id": "default"}
    assert root.read_tensors_metadata("deltas/q.safetensors") == {"config_id": "default"}  # ranged reads of the header
    root.write_tensors("g.safetensors", {"rows": torch.ones(64, 8), "norms": torch.tensor([3.0, 4.0])})
    assert root.read_tensor("g.safetensors", "norms")[0].tolist() == [3.0, 4.0]  # by range: not the rows
    assert root.local_path(KEY) is None


def test_glob_right_after_a_write_sees_the_new_object(s3_root):
    root = Storage(s3_root)
    write_table(root, "queries", QUERY, query_id="0012")
    assert root.glob("queries/*/part-*.parquet") == [KEY]
    write_table(root, "queries", QUERY, query_id="q2")
    assert root.glob("queries/*/part-*.parquet") == [KEY, "queries/query_id=q2/part-0.parquet"]
    root.delete("queries", recursive=True)
    assert root.glob("queries/*/part-*.parquet") == [] and not root.exists(KEY)


def test_a_second_storage_object_sees_writes_of_the_first(s3_root):
    reader = Storage(s3_root)
    assert reader.glob("queries/*/part-*.parquet") == []
    write_table(Storage(s3_root), "queries", QUERY, query_id="0012")
    assert reader.glob("queries/*/part-*.parquet") == [KEY]  # no stale listing cache


def test_put_dir_and_get_dir(s3_root, tmp_path):
    root = Storage(s3_root)
    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "unet" / "config.json").write_text('{"a": 1}')
    root.put_dir(tmp_path / "model", "checkpoints/m")
    assert root.exists("checkpoints/m/_SUCCESS")
    out = root.get_dir("checkpoints/m", tmp_path / "copy")
    assert (out / "unet" / "config.json").read_text() == '{"a": 1}' and not (out / "_SUCCESS").exists()


def test_missing_object_names_it(s3_root):
    with pytest.raises(StorageError, match=f"no object at {s3_root}/{KEY}"):
        Storage(s3_root).read_bytes(KEY)


def test_views_over_s3_through_the_registered_filesystem(s3_root):
    root = Storage(s3_root)
    write_tiny_dataset(root)
    engine = QueryEngine(root, protocol_id="p", checkpoint_id="c")  # the tiny dataset's identity
    top = engine.named("top_k", k=1).filter(pl.col("method") == "unlearning")
    assert top.select("query_id", "item_id", "artist").rows() == [("0012", "i1", "A"), ("q2", "i3", "B")]
    con = engine.connect()
    try:
        assert "s3" in con.list_filesystems()
        httpfs = con.sql("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchall()
        assert httpfs in ([], [(False,)])  # no extension was needed (nor downloaded)
    finally:
        con.close()


def test_empty_s3_root_gives_empty_views(s3_root):
    counts = QueryEngine(Storage(s3_root)).table_counts()
    assert counts["attributions"] == 0 and set(counts.values()) == {0}


def test_filter_on_query_id_reads_only_that_partition(s3_root):
    root = Storage(s3_root)
    write_tiny_dataset(root)
    opened: list[str] = []
    real_open = root.fs.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    root.fs.open = counting_open  # the instance DuckDB's registered filesystem calls
    df = QueryEngine(root).sql("SELECT method, item_id, score FROM attributions WHERE query_id = '0012'")
    assert df.height == 12  # 6 unlearning + 6 similarity rows
    score_files = {p.removeprefix(f"{s3_root}/") for p in opened if "_scores/" in p}
    assert score_files == {
        "attribution_scores/checkpoint_id=c/protocol_id=p/query_id=0012/config_id=default/part-0.parquet",
        "similarity_scores/query_id=0012/method=similarity:audio/part-0.parquet",
    }  # the files of query q2 were never opened


def test_unreachable_endpoint_is_one_clear_error(s3_root):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_retries = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    root = Storage(s3_root, endpoint_url=f"http://127.0.0.1:{port}", storage_options=no_retries)
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port}.*AWS_ENDPOINT_URL"):
        root.check()


def test_missing_bucket_is_one_clear_error(s3_root):
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist.*create it"):
        Storage("s3://no-such-bucket/tda").check()


def test_wrong_credentials_are_one_clear_error(s3_root, monkeypatch):
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-known-key")
    with pytest.raises(StorageError, match="refused the credentials.*check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
        Storage(s3_root).check()
