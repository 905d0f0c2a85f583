"""The GPU code path (autocast forward passes, fp32 unlearned weights, device choice) runs on CPU too."""

import torch

from resources import ComputeResource
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.losses import batch_losses, stream_losses
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn

BF16 = Compute(device="cpu", autocast_dtype="bfloat16", batch_size=16)


def small_batch(adapter: EmbeddedAdapter, n: int = 4) -> ItemBatch:
    g = torch.Generator().manual_seed(0)
    c, t = adapter.latent_shape
    cond = {"encoder_hidden_states": torch.randn(n, 6, 384, generator=g), "global_hidden_states": torch.randn(n, 1, 384, generator=g)}
    return ItemBatch([f"i{k}" for k in range(n)], torch.randn(n, c, t, generator=g), cond, torch.ones(n, t))


def test_bf16_autocast_losses_match_fp32_within_bf16_precision():
    adapter = EmbeddedAdapter.new()
    batch = small_batch(adapter)
    fp32 = batch_losses(adapter, batch, LossProtocol(draws=3), Compute()).loss
    bf16 = batch_losses(adapter, batch, LossProtocol(draws=3), BF16).loss
    assert bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # the autocast path really ran in bf16
    assert torch.allclose(fp32, bf16, rtol=0.05)


def test_unlearning_under_autocast_keeps_fp32_weights_and_delta():
    adapter = EmbeddedAdapter.new()
    batch = small_batch(adapter)
    fisher = fisher_diagonal(adapter, [batch], LossProtocol(draws=2), "attention", BF16)
    result = unlearn(adapter, batch.select([0]), fisher, UnlearningSettings(lr=50.0, param_subset="attention", query_draws=4),
                     LossProtocol(draws=2), BF16, n_train=4)
    assert all(d.dtype == torch.float32 for d in result.delta.values())
    assert all(p.dtype == torch.float32 for p in adapter.denoiser.parameters())
    assert result.query_loss_after > result.query_loss_before


def test_compute_resource_picks_cpu_without_a_gpu_and_bf16_on_cuda():
    auto = ComputeResource().compute()
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = ComputeResource(device="cuda").compute()
    assert cuda.autocast_dtype == "bfloat16" and cuda.torch_device.type == "cuda"


def test_losses_stream_batch_by_batch():
    adapter = EmbeddedAdapter.new()
    produced = []

    def batches():
        for k in range(3):
            produced.append(k)
            yield small_batch(adapter, 2)

    stream = stream_losses(adapter, batches(), LossProtocol(draws=2), Compute())
    next(stream)
    assert produced == [0]  # only the first batch was read before its losses came out
