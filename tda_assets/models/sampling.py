"""Generating latents from a prompt's conditioning with a diffusers scheduler and classifier-free guidance."""

from __future__ import annotations

import warnings

import torch
from diffusers import CosineDPMSolverMultistepScheduler

from tda_assets.attribution.adapter import DiTAdapter
from tda_assets.attribution.devices import Compute


def default_scheduler() -> CosineDPMSolverMultistepScheduler:
    """Stable Audio Open's sampler for its v-objective on the cosine schedule (σ = tan(πt/2))."""
    return CosineDPMSolverMultistepScheduler(
        sigma_min=0.01, sigma_max=80.0, sigma_data=1.0, prediction_type="v_prediction"
    )


def generate_latents(
    adapter: DiTAdapter,
    conditioning: dict[str, torch.Tensor],
    seed: int,
    compute: Compute,
    steps: int = 40,
    guidance_scale: float = 3.0,
    scheduler: CosineDPMSolverMultistepScheduler | None = None,
) -> torch.Tensor:
    """Latents [b, C, T] for a batch of conditionings; deterministic in `seed`."""
    if adapter.objective.prediction != "v":
        raise ValueError(
            "generate_latents samples v-prediction models; this adapter's objective is " + adapter.objective.prediction
        )
    sched = scheduler or getattr(adapter, "scheduler", None) or default_scheduler()
    sched.set_timesteps(steps, device="cpu")
    b = next(iter(conditioning.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    device = adapter.device
    latents = (torch.randn(b, *adapter.latent_shape, generator=g) * sched.init_noise_sigma).to(device)
    cond = {k: v.to(device) for k, v in conditioning.items()}
    uncond = adapter.null_conditioning(cond)
    both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
    with torch.no_grad(), compute.autocast(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have", module="torchsde")  # the SDE sampler's boundary notes
        for t in sched.timesteps:
            x_in = sched.scale_model_input(latents, t)
            tt = t.to(device).float().expand(2 * b)
            out = adapter.predict(torch.cat([x_in, x_in]), tt, both).float()
            uncond, text = out.chunk(2)
            v = uncond + guidance_scale * (text - uncond)
            latents = sched.step(v, t, latents, generator=g).prev_sample
    return latents.float().cpu()
