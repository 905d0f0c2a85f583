"""Compute placement and the loss protocol as Dagster resources."""

import torch
from dagster import ConfigurableResource

from tda_assets.attribution.devices import DEFAULT_BATCH_ROWS, Compute
from tda_assets.attribution.protocol import LossProtocol


class ComputeResource(ConfigurableResource):
    """`device`: `auto` (cuda when present, else cpu), `cpu` or `cuda[:n]`; bf16 autocast on GPU; rows per forward
    pass."""

    device: str = "auto"
    autocast_dtype: str | None = None
    batch_size: int | None = None  # None: the engine's DEFAULT_BATCH_ROWS
    grad_rows: int | None = None  # rows per gradient pass (TDA_GRAD_ROWS); None: all of an item's draws at once
    threads: int | None = None

    def compute(self) -> Compute:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            auto = Compute.auto(self.batch_size or DEFAULT_BATCH_ROWS, self.grad_rows)
            device, default_dtype = auto.device, auto.autocast_dtype
        else:
            device, default_dtype = self.device, ("bfloat16" if self.device.startswith("cuda") else None)
        dtype = self.autocast_dtype if self.autocast_dtype is not None else default_dtype
        return Compute(device, dtype, self.batch_size or DEFAULT_BATCH_ROWS, self.grad_rows)


class LossProtocolResource(ConfigurableResource):
    """The fixed loss protocol: `draws` draws per item, seeded by `seed`, losses measured in `precision` (DESIGN §1)."""

    seed: int = 0
    draws: int = 16
    precision: str = "fp32"  # `fp32` or `bf16`: part of the protocol's id (TDA_LOSS_PRECISION)

    def protocol(self) -> LossProtocol:
        return LossProtocol(seed=self.seed, draws=self.draws, precision=self.precision)
