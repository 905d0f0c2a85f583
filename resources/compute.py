"""Compute placement and the loss protocol as Dagster resources."""

import torch
from dagster import ConfigurableResource

from tda_assets.attribution.devices import DEFAULT_BATCH_ROWS, Compute
from tda_assets.attribution.protocol import LossProtocol


class ComputeResource(ConfigurableResource):
    """`device`: `auto` (cuda when present, else cpu), `cpu` or `cuda[:n]`; bf16 autocast on GPU; rows per forward pass."""

    device: str = "auto"
    autocast_dtype: str | None = None
    batch_size: int | None = None  # None: the engine's DEFAULT_BATCH_ROWS
    threads: int | None = None
    fp32_losses: bool = False  # measure losses without autocast (rescoring in fp32 keeps weak unlearning's ranking)

    def compute(self) -> Compute:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            auto = Compute.auto(self.batch_size or DEFAULT_BATCH_ROWS)
            device, default_dtype = auto.device, auto.autocast_dtype
        else:
            device, default_dtype = self.device, ("bfloat16" if self.device.startswith("cuda") else None)
        dtype = self.autocast_dtype if self.autocast_dtype is not None else default_dtype
        return Compute(device, dtype, self.batch_size or DEFAULT_BATCH_ROWS, fp32_losses=self.fp32_losses)


class LossProtocolResource(ConfigurableResource):
    """The fixed loss protocol: `draws` draws per item, seeded by `seed` (DESIGN §1)."""

    seed: int = 0
    draws: int = 16

    def protocol(self) -> LossProtocol:
        return LossProtocol(seed=self.seed, draws=self.draws)
