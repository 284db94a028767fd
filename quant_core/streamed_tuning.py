"""End-to-end tuning of a model streamed from disk (``--lazy-load``), one block in memory at a time.

The tuning (quant_core.finetune) trains every group's step size and every norm against the
full-precision model's next-token distributions, which needs a backward pass through the whole
model. Streamed, each step runs the blocks forward without a graph, keeping only the hidden state
that enters each block (windows x tokens x hidden per block); the loss and the final norm give the
gradient of the last block's output; then the blocks run again in reverse order, each rebuilt from
disk with its trainable step sizes and norms attached, recomputing its forward with a graph from the
kept input and taking the gradient one block further back. Adam steps once all blocks have their
gradients, so a step is the whole-model step of the in-memory tuning (the same updates, up to the
order of floating-point sums); what it costs is reading every block twice a step.

Calibrated blocks are rebuilt from the job's block checkpoint (quant_core.checkpoint: weights and
grids), and the tuned step sizes and norms of all blocks stay in memory between steps (about one
float per group besides Adam's two, and the norms). At the end every block is rebuilt once more with
its tuned grid and written again by the job's writers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.engine import capture_block_inputs, run_block, run_block_batched
from quant_core.finetune import FloatMaster, GridScales, run_schedule, student_outputs, tuning_dtype
from quant_core.finetune_options import FinetuneOptions
from quant_core.lazy_model import LazyModel, ShardWriter, replaced_blocks
from quant_core.loss_base import ModelOutputs
from quant_core.losses import build_loss
from quant_core.methods.normtweaking import norm_parameters
from quant_core.model_structure import last_hidden_state, output_layer, quantizable_linears
from quant_core.progress import PhaseProgress
from quant_core.spill import Spill

RestoreBlock = Callable[[int, nn.Module], None]  # puts calibrated block ``index``'s weights and grids in place


@torch.no_grad()
def record_streamed_teacher(
    lazy: LazyModel, windows: Tensor, device: str, batch_size: int = 4, spill: Spill | None = None
) -> Tensor:
    """The full-precision model's last hidden states on ``windows`` (what quant_core.finetune's
    ``record_teacher`` records), streaming the source checkpoint's blocks one at a time."""
    captured = capture_block_inputs(lazy.model, windows, device)
    hidden = captured.hidden
    for index, block in enumerate(lazy.blocks):
        lazy.load_block(index).to(device)
        hidden = run_block_batched(block, hidden, captured.kwargs, batch_size)
        lazy.release_block(index)
    finals = []
    for ids, final in zip(windows.split(batch_size), hidden.split(batch_size), strict=True):
        with replaced_blocks(lazy, final):
            finals.append(last_hidden_state(lazy.model, ids.to(device)).cpu())
    teacher = torch.cat(finals)
    return teacher if spill is None else spill.keep(teacher)


@dataclass
class _Tunables:
    """What training changes, kept between steps: each block's log step sizes and norm copies, and the
    norms outside the blocks (the final norm), by name."""

    thetas: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    masters: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    outside: list[FloatMaster] = field(default_factory=list)

    def tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The norms' copies and the step sizes, the two groups Adam trains."""
        return [*self.masters.values(), *(m.master for m in self.outside)], list(self.thetas.values())


@contextmanager
def _tuned_block(
    lazy: LazyModel, index: int, restore: RestoreBlock, tunables: _Tunables, group_size: int | None, device: str
) -> Iterator[tuple[nn.Module, list[tuple[str, GridScales]], list[FloatMaster]]]:
    """Block ``index`` rebuilt from disk, its grids and norms trainable with the kept tensors (made on
    first use); released again on exit, its weights given back before."""
    block = lazy.load_block(index)
    restore(index, block)
    grids: list[tuple[str, GridScales]] = []
    norms: list[FloatMaster] = []
    try:
        for name, layer in quantizable_linears(block).items():
            grid = GridScales.of(layer, group_size)
            if grid is not None:
                grid.theta = tunables.thetas.setdefault((index, name), grid.theta)
                grids.append((name, grid))
        for full_name in dict.fromkeys(norm_parameters(block)):
            module_name, _, name = full_name.rpartition(".")
            norm = FloatMaster(block.get_submodule(module_name), name)
            norm.master = tunables.masters.setdefault((index, full_name), norm.master)
            norms.append(norm)
        block.to(device)
        yield block, grids, norms
    finally:
        for name, grid in grids:
            grid.restore(block, name)
        for norm in norms:
            norm.restore()
        block.to("cpu")


def _outside_norms(lazy: LazyModel) -> list[FloatMaster]:
    """Trainable copies of the norms outside the blocks (the final norm), as the in-memory tuning trains."""
    inside = {id(p) for p in lazy.blocks.parameters()}
    masters = []
    for full_name, param in norm_parameters(lazy.model).items():
        if id(param) not in inside:
            module_name, _, name = full_name.rpartition(".")
            masters.append(FloatMaster(lazy.model.get_submodule(module_name), name))
    return masters


@dataclass(frozen=True)
class StreamedTuning:
    """The streamed tuning of one job: its model, how calibrated blocks come back, and its settings."""

    lazy: LazyModel
    restore: RestoreBlock
    options: FinetuneOptions
    group_size: int | None
    device: str = "cpu"

    def _attach_all(self, tunables: _Tunables) -> None:
        """Visit every block once so each trainable tensor exists before the optimizer is built."""
        for index in range(len(self.lazy.blocks)):
            with _tuned_block(self.lazy, index, self.restore, tunables, self.group_size, "cpu"):
                pass
            self.lazy.release_block(index)

    def _step(self, ids: Tensor, teacher: Tensor, tunables: _Tunables, loss_fn: Any, autocast: Any) -> Tensor:
        """One window batch's loss, with every trainable tensor's gradient accumulated."""
        device, lazy = self.device, self.lazy
        captured = capture_block_inputs(lazy.model, ids, device)
        hidden = captured.hidden.to(device)
        kept = []
        for index in range(len(lazy.blocks)):  # forward, keeping what enters each block
            kept.append(hidden)
            with _tuned_block(lazy, index, self.restore, tunables, self.group_size, device) as (block, grids, norms):
                for _, grid in grids:
                    grid.attach()
                for norm in norms:
                    norm.attach()
                with torch.no_grad(), autocast():
                    hidden = run_block(block, hidden, captured.kwargs)
            lazy.release_block(index)
        final = hidden.detach().requires_grad_(True)
        for norm in tunables.outside:
            norm.attach()
        head = output_layer(lazy.model, "finetune.epochs")
        with replaced_blocks(lazy, final):
            student = student_outputs(lazy.model, ids.to(device), head, autocast)
        terms = loss_fn.model_terms(student, ModelOutputs(None, teacher.to(device), head))
        loss = sum(terms.values())
        assert isinstance(loss, Tensor)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"streamed end-to-end tuning: the loss became {loss.item()}")
        loss.backward()
        gradient = final.grad
        for index in reversed(range(len(lazy.blocks))):  # backward, one block at a time
            with _tuned_block(lazy, index, self.restore, tunables, self.group_size, device) as (block, grids, norms):
                for _, grid in grids:
                    grid.attach()
                for norm in norms:
                    norm.attach()
                entering = kept[index].detach().requires_grad_(index > 0)
                with autocast():
                    out = run_block(block, entering, captured.kwargs)
                assert gradient is not None  # the loss depends on every block's output
                out.backward(gradient.to(out.dtype))
                gradient = entering.grad
            lazy.release_block(index)
        return loss.detach()

    def tune(
        self,
        windows: Tensor,
        teacher: Tensor,
        *,
        seed: int = 0,
        on_stage: Callable[[str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> tuple[dict[str, Any], _Tunables]:
        """Train; the report's statistics (as quant_core.finetune's ``tune_end_to_end`` gives them, without
        the gradient shares) and the tuned tensors for :meth:`write`."""
        options = self.options
        loss_fn = build_loss(options.loss, seed=seed)
        compute_dtype, device_type = tuning_dtype(options, self.device), torch.device(self.device).type
        autocast = partial(torch.autocast, device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
        tunables = _Tunables(outside=_outside_norms(self.lazy))
        self._attach_all(tunables)
        norms, thetas = tunables.tensors()
        optimizer = torch.optim.Adam([{"params": norms, "lr": options.norm_lr}, {"params": thetas, "lr": options.lr}])
        steps = options.steps(windows.shape[0])
        progress = PhaseProgress("end-to-end tuning (streamed)", steps, "steps", on_stage or (lambda _: None))

        def step(_: int, idx: Tensor) -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = float(self._step(windows[idx], teacher[idx], tunables, loss_fn, autocast).item())
            optimizer.step()
            return loss

        try:
            epoch_losses = run_schedule(
                options, windows.shape[0], seed, optimizer, step, progress, loss_fn.name, should_cancel, on_step
            )
        finally:
            for norm in tunables.outside:
                norm.restore()
        return {
            "loss": loss_fn.name,
            "epochs": options.epochs,
            "steps": steps,
            "windows": windows.shape[0],
            "grid_linears": len(thetas),
            "norm_tensors": len(norms),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "epoch_losses": epoch_losses,
            "streamed": True,
            "seconds_per_step": (progress.clock() - progress.started) / max(steps, 1),
        }, tunables

    def write(self, tunables: _Tunables, writers: list[ShardWriter]) -> None:
        """Rebuild every block with its tuned grid and norms and write it again with each writer."""
        for index in range(len(self.lazy.blocks)):
            with _tuned_block(self.lazy, index, self.restore, tunables, self.group_size, "cpu"):
                pass  # leaving writes the tuned weights and grids into the block
            for writer in writers:
                writer.write_block(index)
            self.lazy.release_block(index)
