"""Peak memory per stage: each stage's host peak is measured from its own start (Linux's resettable
high-water mark), so a large stage does not hide the peaks of the small ones after it."""

from __future__ import annotations

import sys

import pytest
import torch

from quant_core.memory import StagePeaks

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resettable high-water mark is Linux's")
def test_each_stage_reports_its_own_peak() -> None:
    peaks = StagePeaks("cpu")
    with peaks.stage("large"):
        held = torch.ones(256 * MIB // 4)  # 256 MiB, written, so resident
        del held
    with peaks.stage("small"):
        held = torch.ones(MIB // 4)
        del held
    assert peaks.separate
    assert peaks.host_mb["large"] - peaks.host_mb["small"] > 200  # the small stage does not carry the large peak
    assert peaks.overall_host_mb == peaks.host_mb["large"]
    assert peaks.to_dict() == {"host_mb": peaks.host_mb, "per_stage": True}
