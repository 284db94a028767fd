"""Resuming a calibration run from its last finished block.

After each block the engine stores what the rest of the run depends on: that block's quantized
parameters, the inputs of the next block for both chains (full precision and quantized) and the
per-block records. Every random draw of a block is seeded from the job seed and the block index, so
no other RNG state is needed: a run restarted with the same job and directory continues at the next
block and ends bit-for-bit where an uninterrupted run would.

Writes are ordered so a crash at any point leaves a usable checkpoint: the block's weights first,
then the state file (next block, inputs, records) by atomic rename. A checkpoint written for a
different job (another fingerprint) is refused rather than silently mixed in.

On several ranks (quant_core.distributed) each rank writes its share of both chains to a file of its
own, named by the windows it holds and one of two slots that alternate by block (a crash while
block i's files are written leaves block i-1's whole); the leader writes the block's weights, then,
once every rank's file is written, the state file listing them, and removes the files it no longer
lists. A run resumes at any world size: each rank reads the rows of its share from whichever files
hold them, and one process reads a checkpoint that several wrote and the other way round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quant_core.distributed import SOLO, Ranks
from quant_core.errors import ConfigError
from quant_core.methods.base import KEPT_BUFFERS
from quant_core.model_structure import quantizable_linears

STATE_FILE = "state.safetensors"
ALLOCATION_FILE = "allocation.json"  # a size budget's schemes (quant_core.bit_budget)
CHAINS = "chains{slot}_{start:06d}_{end:06d}.safetensors"  # one rank's windows [start, end) of both chains


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
    """The files ``BlockCheckpoint.save`` wrote for block ``index``, in the order they must be copied,
    and a size budget's allocation where the job has one.

    A copy elsewhere (object storage) stays usable at every point only if, like the local writes,
    the block's weights and the ranks' chains land before the state file that points past them.
    """
    directory = Path(directory)
    chains = sorted(directory.glob(CHAINS.split("{")[0] + f"{index % 2}_*.safetensors"))
    allocation = [directory / ALLOCATION_FILE] if (directory / ALLOCATION_FILE).is_file() else []
    return [directory / f"block_{index:05d}.safetensors", *chains, *allocation, directory / STATE_FILE]


def stored_fingerprint(directory: Path) -> str | None:
    """The fingerprint of the job whose progress ``directory`` holds; None when it holds none."""
    state_path = Path(directory) / STATE_FILE
    if not state_path.is_file():
        return None
    with safe_open(str(state_path), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint")


class BlockCheckpoint:
    """A directory holding a run's progress, tied to one job by ``fingerprint``."""

    def __init__(self, directory: Path, fingerprint: str, ranks: Ranks = SOLO) -> None:
        self.directory, self.fingerprint, self.ranks = Path(directory), fingerprint, ranks

    def _block_path(self, index: int) -> Path:
        return saved_files(self.directory, index)[0]

    def save(
        self,
        index: int,
        block: nn.Module,
        fp_inputs: Tensor,
        q_inputs: Tensor,
        records: list[dict[str, Any]],
        start: int = 0,
    ) -> None:
        """Record that block ``index`` (the last of ``records``) is finished; the next block gets these
        inputs, this rank's windows from ``start`` on (the full-precision chain may hold fewer)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint}
        if self.ranks.leader:
            _atomic_save({**block.state_dict(), **_grid_state(block)}, self._block_path(index), meta)
        state_meta = {**meta, "records": json.dumps(records)}
        if not self.ranks.distributed:
            _atomic_save({"fp_inputs": fp_inputs, "q_inputs": q_inputs}, self.directory / STATE_FILE, state_meta)
            return
        name = CHAINS.format(slot=index % 2, start=start, end=start + q_inputs.shape[0])
        chain_meta = {**meta, "fp_rows": str(fp_inputs.shape[0])}
        _atomic_save({"fp_inputs": fp_inputs, "q_inputs": q_inputs}, self.directory / name, chain_meta)
        names = self.ranks.objects(name)  # also: every rank's file is written
        if self.ranks.leader:
            state_meta["chains"] = json.dumps(names)
            _atomic_save({"world_size": torch.tensor(self.ranks.world_size)}, self.directory / STATE_FILE, state_meta)
            for stale in self.directory.glob(CHAINS.split("{")[0] + "*.safetensors"):
                if stale.name not in names:
                    stale.unlink()
        self.ranks.objects(None)  # nobody writes the next block's files before the stale ones are gone

    def load(self, share: tuple[int, int, int] | None = None) -> ResumePoint | None:
        """Where a stored run of this job stopped; None for a fresh start. The finished blocks' weights
        are then put back one at a time with :meth:`restore`. ``share`` (start, end, full-precision
        end): only those windows of the chains, the quantized one's ``[start, end)`` and the
        full-precision one's ``[start, full-precision end)``; None: every stored window."""
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
            metadata = f.metadata() or {}
        records = json.loads(metadata["records"])
        if "chains" not in metadata:  # one process wrote it: both chains in the state file
            tensors = load_file(str(state_path))
            fp_inputs, q_inputs = tensors["fp_inputs"], tensors["q_inputs"]
            if share is not None:
                fp_inputs, q_inputs = fp_inputs[share[0] : share[2]], q_inputs[share[0] : share[1]]
            return ResumePoint(fp_inputs, q_inputs, records)
        files = [self.directory / name for name in json.loads(metadata["chains"])]
        if share is None:
            share = (0, _stored_windows(files, "q_inputs"), _stored_windows(files, "fp_inputs"))
        return ResumePoint(
            _rows(files, "fp_inputs", share[0], share[2]), _rows(files, "q_inputs", share[0], share[1]), records
        )

    def save_allocation(self, allocation: dict[str, Any]) -> None:
        """Keep a size budget's allocation: the blocks stored after it were calibrated at its schemes,
        so a resumed run must take it rather than measure again (on other hardware, or other float
        round-off, the choice could differ)."""
        if not self.ranks.leader:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / ALLOCATION_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "allocation": allocation}), encoding="utf-8")
        os.replace(tmp, path)

    def load_allocation(self) -> dict[str, Any] | None:
        """This job's stored allocation; None when there is none (or it is another job's)."""
        path = self.directory / ALLOCATION_FILE
        if not path.is_file():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored["allocation"] if stored.get("fingerprint") == self.fingerprint else None

    def restore(self, index: int, block: nn.Module) -> None:
        """Put finished block ``index``'s stored weights and grids into ``block`` (in memory)."""
        _load_block(block, load_file(str(self._block_path(index))))


def _chain_files(files: list[Path], key: str) -> list[tuple[int, int, Path]]:
    """Each rank's file with the windows ``[start, end)`` of chain ``key`` it holds, by start."""
    spans = []
    for path in files:
        start = int(path.stem.split("_")[1])
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_slice(key).get_shape()[0]
        spans.append((start, start + rows, path))
    return sorted(spans)


def _stored_windows(files: list[Path], key: str) -> int:
    return max((end for _, end, _ in _chain_files(files, key)), default=0)


def _rows(files: list[Path], key: str, start: int, end: int) -> Tensor:
    """Windows ``[start, end)`` of chain ``key``, read from the files that hold them (only those rows)."""
    parts = []
    for first, last, path in _chain_files(files, key):
        low, high = max(start, first), min(end, last)
        if low < high:
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_slice(key)[low - first : high - first])
    held = sum(part.shape[0] for part in parts)
    if held != end - start:
        raise ConfigError(f"the checkpoint holds {held} of windows {start}..{end} of the {key} chain", "checkpoint")
    return torch.cat(parts)
