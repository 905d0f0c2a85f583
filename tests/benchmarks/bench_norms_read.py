"""What a query of the default configuration (score_type `normalized`) reads for its item norms (run on demand): the
whole training_gradients store plus the Fisher (`read_gradient_store(...).item_norms`, what it read before the norms
were stored; the code before also read the Fisher's bytes a second time for its digest, which this path now reads
from the header, so the old cost was higher still) against the stored norms alone (`read_gradient_norms`), on a
synthetic store of N items × k written through the product's writers, on a local root and on a moto S3 server on
127.0.0.1. The last line is one JSON object.

    python -m tests.benchmarks.bench_norms_read --items 20000 --k 4096 --shards 8 --parameters 20000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pytest
import torch

from tda_assets.attribution.gradients import GradientSpec, GradientStore
from tda_assets.io.artifacts import Identity, read_fisher, write_fisher
from tda_assets.io.gradients import fisher_digest, read_gradient_norms, read_gradient_store, write_gradient_store
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage

IDENTITY = Identity("bench-ckpt", "s0-k16")
ENCODER = "bench-enc"


def build(root: Storage, items: int, k: int, shards: int, parameters: int) -> list[str]:
    """A Fisher of `parameters` values and a store of `items` random rows in `shards` shards; returns the item ids."""
    gen = torch.Generator().manual_seed(0)
    write_fisher(root, IDENTITY, {"w": torch.rand(parameters, generator=gen) + 0.1}, {})
    digest = fisher_digest(root, IDENTITY)
    spec, ids = GradientSpec(k=k), []
    for s, part in enumerate(np.array_split(np.arange(items), shards)):
        shard = f"shard-{s:02d}"
        part_ids = [f"item-{i:07d}" for i in part]
        root.write_tensors(key("training_features", encoder_id=ENCODER, shard=shard), {"x": torch.zeros(1)})
        gradients = GradientStore(
            part_ids,
            torch.randn(len(part), k, generator=gen),
            "all",
            IDENTITY.protocol_id,
            False,
            k,
            0,
            {"w": parameters},
            damping=spec.damping,
        )
        write_gradient_store(root, IDENTITY, spec, shard, gradients, digest)
        ids += part_ids
    return ids


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(root: Storage, args: argparse.Namespace) -> dict:
    ids = build(root, args.items, args.k, args.shards, args.parameters)
    spec = GradientSpec(k=args.k)
    order = list(reversed(ids))
    before, old = timed(
        lambda: read_gradient_store(root, IDENTITY, spec, read_fisher(root, IDENTITY), ENCODER, order).item_norms,
        args.repeats,
    )
    after, new = timed(lambda: read_gradient_norms(root, IDENTITY, spec, ENCODER, order), args.repeats)
    assert np.array_equal(old, new), "the stored norms differ from the rows' norms"
    rows_mb = args.items * args.k * 4 / 2**20
    return {
        "root": root.protocol,
        "rows_MiB": round(rows_mb, 1),
        "fisher_MiB": round(args.parameters * 4 / 2**20, 1),
        "store_and_fisher_s": round(before, 3),
        "stored_norms_s": round(after, 4),
        "speedup": round(before / after, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--parameters", type=int, default=20_000_000, help="Fisher size (a 1B model: 1e9)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="local root only")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(Storage(f"{tmp}/root"), args))
    if not args.no_s3:
        from tests.s3_server import moto_server, use_moto

        mp = pytest.MonkeyPatch()
        with moto_server() as endpoint:
            results.append(measure(Storage(use_moto(mp, endpoint)), args))
        mp.undo()
    for r in results:
        print(
            f"{r['root']:>5}: store {r['rows_MiB']} MiB + Fisher {r['fisher_MiB']} MiB read in "
            f"{r['store_and_fisher_s']} s; stored norms in {r['stored_norms_s']} s ({r['speedup']}x)"
        )
    print(
        json.dumps(
            {"items": args.items, "k": args.k, "shards": args.shards, "parameters": args.parameters, "results": results}
        )
    )


if __name__ == "__main__":
    main()
