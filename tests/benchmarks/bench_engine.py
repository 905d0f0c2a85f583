"""Engine benchmark (run on demand: `make bench`): prints throughput figures on this machine.

Figures: draw generation (draws/s), loss evaluation (item-draws/s) at several forward batch sizes,
Fisher (items/s), unlearning (s/query) and training (s/step) on the embedded model.
"""

import argparse
import time
import warnings

import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.losses import batch_losses
from tda_assets.models.model_folder import load_model
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a saved model folder (default: a fresh embedded model)")
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--draws", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    adapter = load_model(args.model) if args.model else EmbeddedAdapter.new()
    c, t = adapter.latent_shape
    ids = [f"bench-{i:05d}" for i in range(args.items)]
    cond = {
        "encoder_hidden_states": torch.randn(args.items, 24, 384),
        "global_hidden_states": torch.randn(args.items, 1, 384),
    }
    batch = ItemBatch(ids, torch.randn(args.items, c, t), cond, torch.ones(args.items, t))
    proto = LossProtocol(draws=args.draws)
    n = args.items * args.draws
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, items {args.items} x draws {args.draws}")
    secs = timed(lambda: proto.draws_for(ids, adapter.latent_shape, adapter.objective))
    print(f"draws:            {n / secs:10.0f} draws/s")
    for bs in (64, 256, 1024):
        secs = timed(lambda: batch_losses(adapter, batch, proto, Compute(batch_size=bs)))
        print(f"losses (bs {bs:4d}): {n / secs:10.0f} item-draws/s")
    secs = timed(lambda: fisher_diagonal(adapter, [batch], proto, "all", Compute(), max_items=32), repeat=1)
    print(f"fisher:           {32 / secs:10.1f} items/s")
    fisher = fisher_diagonal(adapter, [batch], proto, "all", Compute(), max_items=8)
    for settings in (
        UnlearningSettings(),
        UnlearningSettings(recipe="ewc_ascent", lr=3e-4, steps=5, lambda_=10.0, target_ratio=None),
    ):
        secs = timed(
            lambda s=settings: unlearn(adapter, batch.select([0]), fisher, s, proto, Compute(), args.items), repeat=1
        )
        print(
            f"unlearn {settings.recipe:10s} {secs:8.2f} s/query "
            f"(query_draws {settings.query_draws}, steps {settings.steps})"
        )
    fresh = EmbeddedAdapter.new()
    secs = timed(lambda: train_denoiser(fresh, batch, TrainingSettings(steps=20), Compute()), repeat=1)
    print(f"train:            {secs / 20:10.3f} s/step (batch 64)")


if __name__ == "__main__":
    main()
