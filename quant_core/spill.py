"""Activations that wait on disk instead of in memory: the two chains between blocks, the teacher's states.

Between two blocks the engine keeps the next block's inputs for both chains (full precision and
quantized), and end-to-end tuning keeps the full-precision model's last hidden states for every
calibration window: each is windows x tokens x hidden floats, 8.6 GB per tensor for a 70B model's
128 windows of 2048 tokens. A tensor larger than a share of the memory still available is moved
into a file-backed mapping instead: the kernel pages it out under pressure and back in as it is
read, block by block, so what stays resident is what is being computed on. The file is unlinked as
soon as it is mapped, so nothing is left behind whatever ends the process, and its disk space comes
back when the last tensor viewing it is dropped.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# A tensor is spilled when it is larger than this share of the memory available when it is kept: the
# two chains, a block's outputs on the way and the block itself must fit beside it.
AVAILABLE_SHARE = 0.125


def available_bytes() -> int:
    """Memory the kernel says can be given to a process now without swapping (MemAvailable)."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


@dataclass(frozen=True)
class Spill:
    """Where large activations wait: a folder on disk, and the size from which a tensor goes there.

    ``threshold_bytes`` None: the share of available memory (``AVAILABLE_SHARE``), read at each call.
    """

    directory: Path
    threshold_bytes: int | None = None

    def keep(self, tensor: Tensor) -> Tensor:
        """``tensor`` (on the CPU) as it is, or copied into a file-backed mapping when it is large."""
        size = tensor.numel() * tensor.element_size()
        threshold = self.threshold_bytes if self.threshold_bytes is not None else AVAILABLE_SHARE * available_bytes()
        if size == 0 or size < threshold or tensor.device.type != "cpu":
            return tensor
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(dir=self.directory, prefix="activations-")
        os.close(handle)
        try:
            stored = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.unlink(path)  # the mapping holds the data; the disk space returns when it is dropped
        return stored.view(tensor.shape).copy_(tensor)


def spilled(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives in a file-backed mapping (:meth:`Spill.keep` moved it to disk)."""
    return tensor.untyped_storage().filename is not None
