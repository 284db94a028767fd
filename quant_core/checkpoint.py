"""Resuming a calibration run from its last finished block.

After each block the engine stores what the rest of the run depends on: that block's quantized
parameters, the inputs of the next block for both chains (full precision and quantized) and the
per-block records. Every random draw of a block is seeded from the job seed and the block index, so
no other RNG state is needed: a run restarted with the same job and directory continues at the next
block and ends bit-for-bit where an uninterrupted run would.

Writes are ordered so a crash at any point leaves a usable checkpoint: the block's weights first,
then the state file (next block, inputs, records) by atomic rename. A checkpoint written for a
different job (another fingerprint) is refused rather than silently mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quant_core.errors import ConfigError
from quant_core.methods.base import KEPT_BUFFERS
from quant_core.model_structure import quantizable_linears

STATE_FILE = "state.safetensors"


@dataclass
class ResumePoint:
    """Where a stored run stopped: the finished blocks' records and the next block's inputs."""

    fp_inputs: Tensor
    q_inputs: Tensor
    records: list[dict[str, Any]]


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _grid_state(block: nn.Module) -> dict[str, Tensor]:
    """The quantization grids methods keep on the block's linears (not part of ``state_dict``)."""
    return {
        f"{name}.{buffer}": value
        for name, layer in quantizable_linears(block).items()
        for buffer in KEPT_BUFFERS
        if isinstance(value := getattr(layer, buffer, None), Tensor)
    }


def _load_block(block: nn.Module, tensors: dict[str, Tensor]) -> None:
    grids = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] in KEPT_BUFFERS}
    block.load_state_dict({k: v for k, v in tensors.items() if k not in grids})
    for key, value in grids.items():
        module_name, buffer = key.rsplit(".", 1)
        block.get_submodule(module_name).register_buffer(buffer, value, persistent=False)


def saved_files(directory: Path, index: int) -> list[Path]:
    """The files ``BlockCheckpoint.save`` wrote for block ``index``, in the order they must be copied.

    A copy elsewhere (object storage) stays usable at every point only if, like the local writes,
    the block's weights land before the state file that points past them.
    """
    return [Path(directory) / f"block_{index:05d}.safetensors", Path(directory) / STATE_FILE]


def stored_fingerprint(directory: Path) -> str | None:
    """The fingerprint of the job whose progress ``directory`` holds; None when it holds none."""
    state_path = Path(directory) / STATE_FILE
    if not state_path.is_file():
        return None
    with safe_open(str(state_path), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint")


class BlockCheckpoint:
    """A directory holding a run's progress, tied to one job by ``fingerprint``."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory, self.fingerprint = Path(directory), fingerprint

    def _block_path(self, index: int) -> Path:
        return saved_files(self.directory, index)[0]

    def save(
        self, index: int, block: nn.Module, fp_inputs: Tensor, q_inputs: Tensor, records: list[dict[str, Any]]
    ) -> None:
        """Record that block ``index`` (the last of ``records``) is finished; the next block gets these inputs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint}
        _atomic_save({**block.state_dict(), **_grid_state(block)}, self._block_path(index), meta)
        state_meta = {**meta, "records": json.dumps(records)}
        _atomic_save({"fp_inputs": fp_inputs, "q_inputs": q_inputs}, self.directory / STATE_FILE, state_meta)

    def load(self) -> ResumePoint | None:
        """Where a stored run of this job stopped; None for a fresh start. The finished blocks' weights
        are then put back one at a time with :meth:`restore`."""
        state_path = self.directory / STATE_FILE
        fingerprint = stored_fingerprint(self.directory)
        if fingerprint is None:
            return None
        if fingerprint != self.fingerprint:
            raise ConfigError(
                f"checkpoint {self.directory} belongs to another job; use a fresh directory or the same job",
                "checkpoint",
            )
        with safe_open(str(state_path), framework="pt") as f:
            records = json.loads((f.metadata() or {})["records"])
        tensors = load_file(str(state_path))
        return ResumePoint(tensors["fp_inputs"], tensors["q_inputs"], records)

    def restore(self, index: int, block: nn.Module) -> None:
        """Put finished block ``index``'s stored weights and grids into ``block`` (in memory)."""
        _load_block(block, load_file(str(self._block_path(index))))
