"""Records a finished block leaves, for tests that write a job's progress without running one."""

from __future__ import annotations

from swq_shared.events import BlockEvent


def block_event(index: int, num_blocks: int) -> BlockEvent:
    """Block ``index`` done, with plausible figures: losses halved by calibration, no device memory."""
    return BlockEvent(
        index=index,
        num_blocks=num_blocks,
        loss_before=2.0,
        loss_after=1.0,
        mse_before=0.4,
        mse_after=0.2,
        seconds=0.1,
        peak_host_mb=512.0,
        peak_device_mb=None,
    )
