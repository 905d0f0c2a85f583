"""The GPU code path (autocast forward passes, fp32 unlearned weights, device choice) runs on CPU too."""

import torch

from resources import ComputeResource
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.gradients import per_item_gradients
from tda_assets.attribution.losses import batch_losses, expand_draws, frame_errors, reduce_frames, stream_losses
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.similarity import internal_embedding
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn

BF16 = Compute(device="cpu", autocast_dtype="bfloat16", batch_size=16)


def small_batch(adapter: EmbeddedAdapter, n: int = 4) -> ItemBatch:
    g = torch.Generator().manual_seed(0)
    c, t = adapter.latent_shape
    cond = {
        "encoder_hidden_states": torch.randn(n, 6, 384, generator=g),
        "global_hidden_states": torch.randn(n, 1, 384, generator=g),
    }
    return ItemBatch([f"i{k}" for k in range(n)], torch.randn(n, c, t, generator=g), cond, torch.ones(n, t))


def test_losses_are_measured_at_the_protocol_precision_whatever_the_compute_autocast():
    adapter = EmbeddedAdapter.new()
    batch = small_batch(adapter)  # 4 items × 3 draws = 12 rows: one forward pass at BF16's 16 rows
    fp32, bf16 = LossProtocol(draws=3), LossProtocol(draws=3, precision="bf16")
    plain = batch_losses(adapter, batch, fp32, Compute()).loss
    t, eps = bf16.draws_for(batch.item_ids, adapter.latent_shape, adapter.objective)
    z, cond, tt, ee, _ = expand_draws(batch, t, eps, adapter.device)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = reduce_frames(frame_errors(adapter, z, cond, tt, ee).float(), None).view(4, 3)
    assert torch.equal(batch_losses(adapter, batch, fp32, BF16).loss, plain)  # the compute's bf16 does not leak in
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # nor does a caller's
        assert torch.equal(batch_losses(adapter, batch, fp32, Compute()).loss, plain)
    for compute in (Compute(batch_size=16), BF16):
        measured = batch_losses(adapter, batch, bf16, compute).loss
        assert measured.dtype == torch.float32 and torch.equal(measured, autocast)
    assert not torch.equal(autocast, plain)  # the bf16 path really ran in bf16
    assert torch.allclose(plain, autocast, rtol=0.05)


def test_training_embeddings_and_gradients_follow_the_protocol_precision_too():
    adapter = EmbeddedAdapter.new()
    batch = small_batch(adapter, 2)
    params = adapter.parameter_subset("attention")
    fp32, bf16 = LossProtocol(draws=2), LossProtocol(draws=2, precision="bf16")
    emb = {p.precision: internal_embedding(adapter, batch, p, BF16) for p in (fp32, bf16)}
    assert torch.equal(emb["fp32"], internal_embedding(adapter, batch, fp32, Compute()))
    assert not torch.equal(emb["fp32"], emb["bf16"])
    grads = {p.precision: per_item_gradients(adapter, batch, p, params, BF16) for p in (fp32, bf16)}
    plain = per_item_gradients(adapter, batch, fp32, params, Compute())
    assert all(torch.equal(grads["fp32"][n], plain[n]) for n in params)
    assert not all(torch.equal(grads["bf16"][n], plain[n]) for n in params)


def test_unlearning_under_autocast_keeps_fp32_weights_and_delta():
    adapter = EmbeddedAdapter.new()
    batch = small_batch(adapter)
    fisher = fisher_diagonal(adapter, [batch], LossProtocol(draws=2), "attention", BF16)
    result = unlearn(
        adapter,
        batch.select([0]),
        fisher,
        UnlearningSettings(lr=50.0, param_subset="attention", query_draws=4),
        LossProtocol(draws=2),
        BF16,
        n_train=4,
    )
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
