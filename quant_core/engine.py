"""The blockwise calibration engine: capture block-0 inputs, then quantize blocks in order.

For each block the engine computes the full-precision target (fp block on the fp chain's inputs),
lets the method calibrate the block on the quantized chain's inputs, and feeds the quantized output
forward as the next block's input, as OmniQuant and GPTQ do. The engine never knows a method's math;
a method never sees more than one block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quant_core.allocation import storage_bits
from quant_core.block_record import BlockRecord
from quant_core.checkpoint import BlockCheckpoint, ResumePoint
from quant_core.distributed import SOLO, Ranks
from quant_core.errors import CancelledError
from quant_core.experts import expert_calibration
from quant_core.losses import Loss, mse
from quant_core.memory import host_peak_mb
from quant_core.methods.base import BlockData, BlockForward, QuantMethod, rtn_weights
from quant_core.methods.layer_inputs import gathered_linear_inputs, recorded_outputs
from quant_core.model_structure import find_decoder_blocks, move_outside_blocks, quantizable_linears, weight_matrix
from quant_core.output_stats import distribution_errors
from quant_core.quantizer import QuantSpec
from quant_core.spill import Spill


class BlockResidency(Protocol):
    """Where blocks live between visits: ``enter`` puts block ``index`` in memory, ``leave`` lets it go.

    The default (None) keeps the whole model in memory; a streaming residency loads each block from
    disk on ``enter`` and writes it out and frees it on ``leave``.
    """

    def enter(self, index: int) -> None: ...

    def leave(self, index: int) -> None: ...


@dataclass
class BlockInputs:
    """Hidden states entering block 0 and the keyword arguments the model passes every block."""

    hidden: Tensor
    kwargs: dict[str, Any]


class _InputsCaptured(Exception):
    """Raised by the capture hook to stop the model's forward right at block 0."""


def to_device(obj: Any, device: str | torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: Tensor, device: str) -> BlockInputs:
    """Run the model on each window until block 0 and keep what block 0 receives.

    One window per call, so batch-shaped keyword arguments (masks) have batch size 1 and broadcast
    over any calibration batch later. Whatever the installed transformers passes (causal mask, rotary
    ``position_embeddings``, ``position_ids``, cache flags) is kept as is.
    """
    blocks = find_decoder_blocks(model)
    move_outside_blocks(model, blocks, device)
    hidden: list[Tensor] = []
    captured_kwargs: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        if not captured_kwargs:
            captured_kwargs.update(kwargs)
        raise _InputsCaptured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in windows:
            with contextlib.suppress(_InputsCaptured):
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    captured_kwargs["use_cache"] = False
    return BlockInputs(torch.cat(hidden), captured_kwargs)


def run_block(
    block: nn.Module, hidden: Tensor, kwargs: Mapping[str, Any], overrides: Mapping[str, Tensor] | None = None
) -> Tensor:
    """One block forward; ``overrides`` replaces parameters by name without touching the module."""
    out = functional_call(block, dict(overrides), (hidden,), dict(kwargs)) if overrides else block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_forward(block: nn.Module, kwargs: Mapping[str, Any]) -> BlockForward:
    """``block``'s forward with the model's keyword arguments bound: what methods call as ``data.forward``."""

    def forward(hidden: Tensor, overrides: Mapping[str, Tensor] | None) -> Tensor:
        return run_block(block, hidden, kwargs, overrides)

    return forward


@torch.no_grad()
def run_block_batched(
    block: nn.Module,
    hidden: Tensor,
    kwargs: Mapping[str, Any],
    batch_size: int,
    overrides: Mapping[str, Tensor] | None = None,
) -> Tensor:
    if not hidden.shape[0]:  # a rank that holds none of the diagnostic windows
        return hidden.clone()
    return torch.cat([run_block(block, h, kwargs, overrides) for h in hidden.split(batch_size)])


def batched_loss(loss: Loss, outputs: Tensor, targets: Tensor, batch_size: int, seed: int) -> float:
    """Sample-weighted mean of the loss over batches; reseeded so before/after see the same draws."""
    loss.reseed(seed)
    pairs = zip(outputs.split(batch_size), targets.split(batch_size), strict=True)
    total = sum(loss(o, t).item() * o.shape[0] for o, t in pairs)
    return total / outputs.shape[0]


def _bits_per_weight(block: nn.Module, schemes: Mapping[str, QuantSpec]) -> float:
    """What the block's linears store per weight at their schemes: codes, scales and zero points."""
    linears = quantizable_linears(block)
    shapes = {name: tuple(weight_matrix(linears[name]).shape) for name in schemes}
    stored = sum(storage_bits(shapes[name][0], shapes[name][1], spec) for name, spec in schemes.items())
    return stored / sum(rows * columns for rows, columns in shapes.values())


def _mse(outputs: Tensor, targets: Tensor) -> float:
    return mse(outputs.float(), targets.float()).item()


# Tokens the before/after records are measured on (whole windows, at least this many): enough for a
# stable block loss and distribution statistics, few enough that the round-to-nearest "before" pass
# (and, for methods that need no targets, the full-precision chain) costs a fraction of a pass when
# calibrating on many windows: 4 windows of 512 tokens, 16 of 128.
DIAGNOSTIC_TOKENS = 2048


def calibrate_blocks(
    model: nn.Module,
    windows: Tensor,
    method: QuantMethod,
    eval_loss: Loss,
    *,
    device: str = "cpu",
    seed: int = 0,
    forward_batch_size: int = 8,
    diagnostic_tokens: int = DIAGNOSTIC_TOKENS,
    on_block: Callable[[BlockRecord], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint: BlockCheckpoint | None = None,
    residency: BlockResidency | None = None,
    expert_min_tokens: int | None = None,
    spill: Spill | None = None,
    ranks: Ranks = SOLO,
    schemes: Sequence[Mapping[str, QuantSpec]] | None = None,
) -> list[BlockRecord]:
    """Quantize every decoder block of ``model`` in place and return one record per block.

    ``eval_loss`` measures each block before (round-to-nearest weights) and after calibration on the
    first windows that hold ``diagnostic_tokens`` tokens, with fixed random draws; the method trains
    with its own loss object. Passes over the data per block: the quantized chain's output (it feeds
    the next block; spared when the method computed it on the way), the full-precision targets (on
    every window only for a method that trains against them, ``needs_targets``, or that reads the
    full-precision linears' inputs recorded on the way, ``needs_float_inputs``; otherwise on the
    diagnostic windows alone), round-to-nearest on the diagnostic windows, and whatever the method
    itself runs. ``should_cancel`` is checked between blocks, so a cancelled run never leaves a
    half-quantized block behind. With a ``checkpoint``, progress is stored after every block and a run
    continues where a previous run of the same job stopped. Both chains' activations wait on the CPU;
    only the block in work and its inputs are on ``device``, and with ``spill`` a chain too large for
    memory waits on disk (quant_core.spill). A mixture-of-experts block is calibrated with every expert
    seeing its routed tokens, or every token below ``expert_min_tokens`` (quant_core.experts); its
    record's method statistics say how many each expert received. ``schemes`` (one mapping per block,
    linear name to scheme: a size budget's allocation, quant_core.allocation) gives linears their own
    widths; a linear it leaves out takes the method's spec.

    On several ``ranks`` each holds its contiguous share of ``windows`` and both chains' activations
    for them; the method sums what it gathers over ranks, and the diagnostic windows' outputs are
    gathered so that every record is measured on the same windows as in one process.
    """
    blocks = find_decoder_blocks(model.eval())
    method.check(blocks)
    captured = capture_block_inputs(model, ranks.share(windows), device)
    measured = max(1, min(-(-diagnostic_tokens // windows.shape[1]), windows.shape[0]))
    # diagnostic windows per rank: the first ``measured`` windows of the job, wherever they are held
    counts = [max(0, min(end, measured) - start) for start, end in ranks.bounds(windows.shape[0])]
    q_inputs = captured.hidden.cpu()
    full_chain = method.needs_targets or method.needs_float_inputs
    fp_inputs = q_inputs.clone() if full_chain else q_inputs[: counts[ranks.rank]].clone()
    start, end = ranks.bounds(windows.shape[0])[ranks.rank]
    share = (start, end, end if full_chain else start + counts[ranks.rank]) if ranks.distributed else None
    resume = _resume(checkpoint, blocks, residency, share) if checkpoint is not None else None
    if resume is not None:
        fp_inputs, q_inputs = resume.fp_inputs, resume.q_inputs
    records = [BlockRecord(**r) for r in resume.records] if resume is not None else []
    # what every block's step shares; index, seed and schemes are the block's own
    common = _BlockStep(0, len(blocks), captured.kwargs, method, eval_loss, counts, device, seed, expert_min_tokens)
    common = replace(common, ranks=ranks, total_windows=windows.shape[0])
    keep = spill.keep if spill is not None else (lambda tensor: tensor)
    fp_inputs, q_inputs = keep(fp_inputs), keep(q_inputs)
    for index in range(len(records), len(blocks)):
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"cancelled before block {index}")
        if residency is not None:
            residency.enter(index)
        step = replace(common, index=index, seed=seed + index, schemes=schemes[index] if schemes is not None else {})
        record, fp_outputs, q_outputs = step.run(blocks[index], fp_inputs, q_inputs, forward_batch_size)
        del fp_inputs, q_inputs  # a spilled chain's file space returns here
        fp_inputs, q_inputs = keep(fp_outputs), keep(q_outputs)
        del fp_outputs, q_outputs
        records.append(record)
        if checkpoint is not None:
            checkpoint.save(index, blocks[index], fp_inputs, q_inputs, [r.to_dict() for r in records], start)
        if residency is not None:
            residency.leave(index)
        if on_block is not None:
            on_block(record)
    return records


def _resume(
    checkpoint: BlockCheckpoint,
    blocks: nn.ModuleList,
    residency: BlockResidency | None,
    share: tuple[int, int, int] | None,
) -> ResumePoint | None:
    """Where a stored run stopped, with its finished blocks put back (a streamed block visits memory to
    be written out again, so the output holds every block whatever the residency); ``share``: this
    rank's windows of the chains (BlockCheckpoint.load)."""
    resume = checkpoint.load(share)
    for index in range(len(resume.records) if resume is not None else 0):
        if residency is not None:
            residency.enter(index)
        checkpoint.restore(index, blocks[index])
        if residency is not None:
            residency.leave(index)
    return resume


@dataclass(frozen=True)
class _BlockStep:
    """One block's calibration between the two chains: what :func:`calibrate_blocks` does per block."""

    index: int
    num_blocks: int
    kwargs: dict[str, Any]
    method: QuantMethod
    eval_loss: Loss
    counts: list[int]  # per rank, the windows the before/after diagnostics are measured on
    device: str
    seed: int  # the block's seed: the job seed plus its index
    expert_min_tokens: int | None  # quant_core.experts.expert_calibration's threshold
    ranks: Ranks = SOLO
    total_windows: int = 0  # over all ranks
    schemes: Mapping[str, QuantSpec] = field(default_factory=dict)  # the block's allocation (BlockData.schemes)

    def gathered(self, local: Tensor) -> Tensor:
        """The diagnostic windows' rows of a chain, from every rank: what one process would hold."""
        return self.ranks.gather(local[: self.counts[self.ranks.rank]], self.counts)

    def run(
        self, block: nn.Module, fp_inputs: Tensor, q_inputs: Tensor, batch_size: int
    ) -> tuple[BlockRecord, Tensor, Tensor]:
        """Calibrate ``block`` in place; its record and both chains' outputs (on the CPU)."""
        method, measured, device = self.method, self.counts[self.ranks.rank], self.device
        started = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        block.to(device).eval().requires_grad_(False)
        fp_in, q_in = fp_inputs.to(device), q_inputs.to(device)
        sites = method.loss.sites if method.needs_targets else ()
        float_linear_inputs: dict[str, list[Tensor]] = {}
        with recorded_outputs(block, sites) as site_outputs, contextlib.ExitStack() as recording:
            if method.needs_float_inputs:
                float_linear_inputs = recording.enter_context(gathered_linear_inputs(block))
            targets = run_block_batched(block, fp_in, self.kwargs, batch_size)
        site_targets = {site: torch.cat(out) for site, out in site_outputs.items()}
        del fp_in, site_outputs
        data = BlockData(
            index=self.index,
            num_blocks=self.num_blocks,
            inputs=q_in,
            targets=targets if method.needs_targets else None,
            forward=block_forward(block, self.kwargs),
            generator=torch.Generator().manual_seed(self.seed),
            site_targets=site_targets,
            float_linear_inputs=float_linear_inputs,
            schemes=self.schemes,
            ranks=self.ranks,
            total_windows=self.total_windows,
        )
        schemes = method.block_schemes(block, data)
        rounded = rtn_weights(block, schemes)
        before = run_block_batched(block, q_in[:measured], self.kwargs, batch_size, rounded)
        before, measured_targets = self.gathered(before), self.gathered(targets)
        loss_before = batched_loss(self.eval_loss, before, measured_targets, batch_size, self.seed)
        mse_before = _mse(before, measured_targets)
        distribution_before = distribution_errors(before, measured_targets, self.seed)
        del before, rounded
        method.loss.reseed(self.seed)
        with expert_calibration(
            block, lambda h: data.forward(h, None), q_in, batch_size, self.expert_min_tokens
        ) as experts:
            stats = method.calibrate(block, data)
        if experts:
            stats = {**stats, "experts": experts}
        q_outputs = data.current_outputs(block)
        if q_outputs is None:
            q_outputs = run_block_batched(block, q_in, self.kwargs, batch_size)
        after = self.gathered(q_outputs)
        peak_host = host_peak_mb()  # since the stage began (quant_core/memory.py)
        record = BlockRecord(
            index=self.index,
            num_blocks=self.num_blocks,
            loss_before=loss_before,
            loss_after=batched_loss(self.eval_loss, after, measured_targets, batch_size, self.seed),
            mse_before=mse_before,
            mse_after=_mse(after, measured_targets),
            distribution_before=distribution_before,
            distribution_after=distribution_errors(after, measured_targets, self.seed),
            seconds=time.perf_counter() - started,
            peak_host_mb=peak_host,
            peak_device_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None,
            peak_host_mb_by_rank=self.ranks.peaks(peak_host) if self.ranks.distributed else [],
            method_stats=stats,
            bits_per_weight=_bits_per_weight(block, schemes),
            schemes={name: spec.label for name, spec in schemes.items()} if self.schemes else {},
        )
        block.to("cpu")
        return record, targets.cpu(), q_outputs.cpu()
