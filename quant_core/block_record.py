"""What happened to one calibrated block, as the engine reports it and the service stores it (without torch)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class BlockRecord(BaseModel):
    """What happened to one block: losses with round-to-nearest (before) and after calibration.

    A pydantic model because the service stores it as the block's event (swq_shared.events.BlockEvent
    extends it) and reads it back from JSON."""

    index: int
    num_blocks: int
    loss_before: float
    loss_after: float
    mse_before: float
    mse_after: float
    seconds: float
    peak_host_mb: float
    peak_device_mb: float | None
    # every rank's host peak, in rank order, when the job runs on several (quant_core.distributed)
    peak_host_mb_by_rank: list[float] = Field(default_factory=list)
    method_stats: dict[str, Any] = Field(default_factory=dict)
    # quant_core.output_stats.distribution_errors of the block output, before and after calibration.
    distribution_before: dict[str, float] = Field(default_factory=dict)
    distribution_after: dict[str, float] = Field(default_factory=dict)
    # what the block's linears store per weight (codes, scales, zero points) at the schemes they were
    # calibrated at; the schemes by linear when a size budget allocated them (quant_core.bit_budget)
    bits_per_weight: float | None = None
    schemes: dict[str, str] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
