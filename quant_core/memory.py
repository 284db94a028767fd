"""Peak memory of each stage of a job, host and device.

Why per stage: a job's peak is reached by different things at different times (the evaluation's
logits over the vocabulary, the teacher's hidden states, the tuning's autograd state, the blocks'
activations), and the process's peak alone does not say which one to bound. On Linux the kernel keeps
a resettable high-water mark of resident memory (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``), so each stage's host peak is measured from its own start; where that
cannot be reset the peaks are cumulative and the report says so. The process's ``ru_maxrss`` follows
the same mark, so after a reset it too reads the peak since the stage began.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def host_peak_mb() -> float:
    """Peak resident memory since the last reset (since the process began where none happened)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        found = None
    if found is not None:
        return int(found.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StagePeaks:
    """Host (and on CUDA, device) peak memory of each named stage, in MiB."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.host_mb: dict[str, float] = {}
        self.device_mb: dict[str, float] = {}
        self.separate = True  # False once a reset failed: later peaks include earlier stages

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the block's peaks as stage ``name`` (a stage met twice keeps its larger peak)."""
        self.separate = _reset_host_peak() and self.separate
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.host_mb[name] = max(self.host_mb.get(name, 0.0), host_peak_mb())
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.device_mb[name] = max(self.device_mb.get(name, 0.0), peak)

    @property
    def overall_host_mb(self) -> float:
        return max(self.host_mb.values(), default=host_peak_mb())

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_mb": self.host_mb,
            **({"device_mb": self.device_mb} if self.cuda else {}),
            "per_stage": self.separate,  # False: each host figure is the peak since the job began
        }
