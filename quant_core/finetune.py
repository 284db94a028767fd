"""End-to-end tuning after blockwise calibration: the whole model's next-token distributions.

Every blockwise method fits one block's output at a time. The errors each leaves add up through
the depth of the model, and none of them looks at what a user samples from, the next-token
distribution. This stage runs after the blocks are quantized, keeps every weight's integer code
fixed, and trains what is cheap and safe to move against the full-precision model's distributions
on the calibration windows:

- the step size of every group of every linear that lies on a grid (the end-to-end stage of
  EfficientQAT, Chen et al. 2024, "E2E-QP"), as ``scale * exp(theta)``: the learning rate is then
  relative, one setting for layers whose scales differ by orders of magnitude, and a step never
  turns a scale negative;
- every normalization weight (as NormTweaking, but for the whole model at once).

The codes never change, so a grid layer stays exactly on its (new) grid and the packed export
writes the tuned scales. A linear quantized in QuIP's rotated basis (GPTQ with ``incoherence:
hadamard``) keeps its rotated grid and rotation (``write_rotated``), and its step sizes move in that
basis; a linear with neither (round-to-nearest or DiscQuant in the rotated basis) keeps its weight,
and only the norms around it move.

The teacher is the full-precision model itself, run once over the windows before calibration: its
last hidden states (small: windows x tokens x hidden) are kept, and its logits are recomputed from
them through the output layer, which no method quantizes, and the model's logit soft-capping
(Gemma 2's ``cap * tanh(logits / cap)``). A model whose logits are anything else is refused.

Memory follows one block, not the model: each block runs under activation checkpointing and each grid
linear makes its weight from its step sizes inside its own forward (:func:`recomputed_blocks`), and
logits are made a chunk of positions at a time (quant_core.loss_base).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from quant_core.distributed import SOLO, HeldBatch, Ranks
from quant_core.errors import CancelledError, ConfigError
from quant_core.finetune_options import FinetuneOptions
from quant_core.incoherence import LinearRotation, restore_rotation
from quant_core.layer_schemes import LayerSchemes
from quant_core.loss_base import ModelOutputs
from quant_core.losses import build_loss
from quant_core.methods.base import layer_grid, rotated_grid, write_quantized, write_rotated
from quant_core.methods.normtweaking import norm_parameters
from quant_core.methods.training import cosine_with_warmup, take_step
from quant_core.model_structure import (
    LinearLike,
    block_names,
    find_decoder_blocks,
    last_hidden_state,
    output_layer,
    quantizable_linears,
    stored_layout,
    weight_matrix,
)
from quant_core.progress import PhaseProgress
from quant_core.quantizer import group_columns, ungroup_columns
from quant_core.spill import Spill


def tuning_dtype(options: FinetuneOptions, device: str) -> torch.dtype:
    """What ``precision`` means on ``device``.

    ``auto`` takes bfloat16 on a CUDA device that supports it and on a CPU with bfloat16 matmul
    instructions (AVX512-BF16 or AMX), where a SmolLM2-135M step took 7.0 s against 9.0 s in
    float32 with the same perplexity (bench/HISTORY.md); elsewhere bfloat16 would be emulated, and
    slower than float32, so it keeps float32.
    """
    if options.precision != "auto":
        return getattr(torch, options.precision)
    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


CHECKED_POSITIONS = 64


@torch.no_grad()
def record_teacher(
    model: nn.Module, windows: Tensor, device: str, batch_size: int = 4, spill: Spill | None = None
) -> Tensor:
    """Run the full-precision model over ``windows`` once; its last hidden states, ``[n, seq, hidden]`` on
    CPU (on disk when ``spill`` finds them large, quant_core.spill).

    Checks on the first window's first ``CHECKED_POSITIONS`` tokens that the output layer applied to
    them gives the model's logits, since training recomputes the teacher's logits that way (and only
    that many logits are made: causal, they need no more of the window).
    """
    nn.Module.to(model, device)
    head = output_layer(model, "finetune.epochs")
    kept = []
    try:
        for index, batch in enumerate(windows.split(batch_size)):
            last = last_hidden_state(model, batch.to(device))
            if index == 0 and not torch.allclose(
                head(last[:1, :CHECKED_POSITIONS]).float(),
                model(input_ids=batch[:1, :CHECKED_POSITIONS].to(device), use_cache=False).logits.float(),
                atol=1e-3,
                rtol=1e-3,
            ):
                raise ConfigError(
                    "end-to-end tuning: this model's logits are not its output layer (and soft-capping) applied to "
                    "its last hidden state, so the teacher cannot be recomputed; set finetune.epochs: 0",
                    "finetune.epochs",
                )
            kept.append(last.cpu())
    finally:
        nn.Module.to(model, "cpu")
    teacher = torch.cat(kept)
    return teacher if spill is None else spill.keep(teacher)


class _ScaledOffsets(torch.autograd.Function):
    """``offsets * steps`` (integer offsets ``[out, groups, size]``, float steps ``[out, groups, 1]``)
    that keeps the integer offsets for the backward pass, not a float32 copy of them: over a whole
    model's linears, that copy is as large as the float32 model."""

    @staticmethod
    def forward(ctx: Any, offsets: Tensor, steps: Tensor) -> Tensor:
        ctx.save_for_backward(offsets)
        return offsets.to(steps.dtype) * steps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (offsets,) = ctx.saved_tensors
        return None, (grad * offsets.to(grad.dtype)).sum(-1, keepdim=True)


class GridScales:
    """A linear whose weight is ``(codes - zero) * scale * exp(theta)``, codes and zero fixed.

    For a layer quantized in QuIP's rotated basis the grid is the rotated one and the weight is
    ``U^T [(codes - zero) * scale * exp(theta)] V``.
    """

    def __init__(
        self, layer: LinearLike, group_size: int | None, scale: Tensor, zero: Tensor, rotation: LinearRotation | None
    ) -> None:
        weight = weight_matrix(layer).detach().float()
        if rotation is not None:
            weight = rotation.rotate(weight)
        self.rotation = rotation
        self.scale, self.zero = scale.float()[..., None], zero.float()[..., None]
        self.layer, self.in_features, self.group_size = layer, weight.shape[1], group_size
        # codes - zero; exact for a layer on its grid, and for a rotated one up to round-off far below half a
        # step; held as small integers (a quarter of float32's memory at up to 7 bits)
        offsets = torch.round(group_columns(weight, group_size) / self.scale)
        self.offsets = offsets.to(torch.int8 if offsets.abs().max() <= 127 else torch.int16)
        del weight, offsets
        self.theta = torch.zeros_like(self.scale, requires_grad=True)
        self.stored: Tensor = layer.weight
        self.shape = self.stored.shape
        del layer.weight  # a plain tensor attribute now: the weight is recomputed from theta every step
        # the stored values are not needed again (restore writes the tuned weight whole): free them
        self.stored.data = self.stored.data.new_empty(0)
        self.detach()

    def detach(self) -> None:
        """Hold no weight between forwards: a storage-less stand-in keeps the shape and dtype that code
        around the layer may read, and any computation on it fails loudly."""
        self.layer.weight = torch.empty(self.shape, dtype=self.stored.dtype, device="meta")

    @classmethod
    def of(cls, layer: LinearLike, group_size: int | None) -> GridScales | None:
        """The layer's grid (or rotated grid) made trainable; None for a layer with neither."""
        plain = layer_grid(layer)
        if plain is not None:
            return cls(layer, group_size, *plain, None)
        rotated = rotated_grid(layer)
        return None if rotated is None else cls(layer, group_size, *rotated)

    def matrix(self) -> Tensor:
        """``[out, in]`` weight at the current step sizes, in the layer's own basis."""
        steps = self.scale * self.theta.exp()
        offsets: Tensor = _ScaledOffsets.apply(self.offsets, steps)  # type: ignore[no-untyped-call]
        matrix = ungroup_columns(offsets, self.in_features)
        return matrix if self.rotation is None else restore_rotation(matrix, self.rotation)

    def attach(self) -> None:
        self.layer.weight = stored_layout(self.layer, self.matrix()).to(self.stored.dtype)

    def attach_in_forward(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Make the weight at the start of each of the layer's forwards and drop it after, so that under
        :func:`recomputed_blocks` only the block being run holds its weights."""
        return [
            self.layer.register_forward_pre_hook(lambda *_: self.attach()),
            self.layer.register_forward_hook(lambda *_: self.detach()),
        ]

    def restore(self, block: nn.Module, name: str) -> None:
        """Put the weight parameter back and write the tuned weight and grid into it (before any step
        attached a weight, the tuned weight is the stored one)."""
        vars(self.layer).pop("weight", None)
        self.stored.data = self.stored.data.new_empty(self.shape)
        self.layer.weight = self.stored
        with torch.no_grad():
            matrix = self.matrix().to(self.stored.dtype)
            scale, zero = (self.scale * self.theta.exp()).squeeze(-1), self.zero.squeeze(-1)
            if self.rotation is None:
                write_quantized(block, {name: (matrix, scale, zero)})
            else:
                write_rotated(block, {name: (matrix, (scale, zero, self.rotation))})


class FloatMaster:
    """A normalization weight trained through a float32 copy, whatever the model's dtype.

    In bfloat16 an Adam step of ``norm_lr`` (3e-4) near 1.0 is below half a bfloat16 step, so a norm
    trained in place never moves; the copy accumulates the steps and the module computes with it
    rounded to its own dtype (the rounding passes the gradient straight through)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.stored = module.get_parameter(name)
        self.master = self.stored.detach().float().clone().requires_grad_(True)
        delattr(module, name)  # a plain tensor attribute now, recomputed from the copy every step

    def attach(self) -> None:
        setattr(self.module, self.name, self.master.to(self.stored.dtype))

    def restore(self) -> None:
        """Put the parameter back, holding the trained copy rounded to its dtype."""
        vars(self.module).pop(self.name, None)
        with torch.no_grad():
            self.stored.copy_(self.master)
        self.module.register_parameter(self.name, self.stored)


def _norm_masters(model: nn.Module) -> list[FloatMaster]:
    """A float32 copy of every normalization weight (a weight shared by two norms is trained once)."""
    seen: set[int] = set()
    masters = []
    for full_name, param in norm_parameters(model).items():
        if id(param) not in seen:
            seen.add(id(param))
            module_name, _, name = full_name.rpartition(".")
            masters.append(FloatMaster(model.get_submodule(module_name), name))
    return masters


def _tunable(
    model: nn.Module, schemes: LayerSchemes
) -> tuple[list[tuple[nn.Module, str, GridScales]], list[FloatMaster]]:
    """Every linear with a grid (by block and name) and every normalization weight of the model;
    ``schemes`` gives each linear's group size (by full module name).

    Making a grid trainable takes the layer's weight parameter away; if one fails, those already
    made give theirs back before the error goes on, so no layer is left without its weight."""
    grids: list[tuple[nn.Module, str, GridScales]] = []
    try:
        for prefix, block in zip(block_names(model), find_decoder_blocks(model), strict=True):
            for name, layer in quantizable_linears(block).items():
                grid = GridScales.of(layer, schemes.of(f"{prefix}.{name}").group_size)
                if grid is not None:
                    grids.append((block, name, grid))
        norms = _norm_masters(model)
    except BaseException:
        _restore(grids, [])
        raise
    return grids, norms


def _restore(grids: list[tuple[nn.Module, str, GridScales]], norms: list[FloatMaster]) -> None:
    """Every trained weight back as a parameter of its module, holding what was trained."""
    for block, name, grid in grids:
        grid.restore(block, name)
    for norm in norms:
        norm.restore()


@contextmanager
def recomputed_blocks(model: nn.Module, grids: list[tuple[nn.Module, str, GridScales]]) -> Iterator[None]:
    """Each decoder block run under activation checkpointing, each grid linear making its weight inside
    its own forward: a tuning step then holds one block's weights and activations at a time, not the
    whole model's (a float32 copy of every block weight and every block's activations, 18 GB of a
    Qwen2.5-1.5B step), for a second forward of each block in the backward pass."""
    hooks = [hook for _, _, grid in grids for hook in grid.attach_in_forward()]
    blocks = find_decoder_blocks(model)
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        # the recomputation runs each block to its end, so every layer's hook drops the weight it made
        with set_checkpoint_early_stop(False):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for block in blocks:
            vars(block).pop("forward", None)


T = TypeVar("T")


def calibrate_then_tune(
    model: nn.Module,
    windows: Tensor,
    options: FinetuneOptions,
    schemes: LayerSchemes,
    calibrate: Callable[[], T],
    *,
    device: str = "cpu",
    seed: int = 0,
    on_stage: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    phase: Callable[[str], AbstractContextManager[None]] = lambda _: nullcontext(),
    spill: Spill | None = None,
    ranks: Ranks = SOLO,
) -> tuple[T, dict[str, Any] | None]:
    """``calibrate()`` (the blockwise calibration of ``model``), then end-to-end tuning when ``options``
    ask for it; returns what ``calibrate`` returned and the tuning's statistics (None when off).
    ``phase(name)`` wraps each part (``teacher``, ``blocks``, ``tuning``): the job measures each one's memory.

    The teacher has to be recorded before the first block is quantized; doing it here keeps every
    caller from getting that order wrong. On several ``ranks`` each records the teacher of its share
    of the windows only.
    """
    if not options.enabled:
        with phase("blocks"):
            return calibrate(), None
    report = on_stage or (lambda _: None)
    report("recording the full-precision model's outputs for end-to-end tuning")
    with phase("teacher"):
        teacher = record_teacher(model, ranks.share(windows), device, spill=spill)
    with phase("blocks"):
        calibrated = calibrate()
    epochs = f"{options.epochs} epoch{'s' if options.epochs > 1 else ''}"
    report(f"end-to-end tuning: {epochs}, loss {options.loss}")
    with phase("tuning"):
        stats = tune_end_to_end(
            model,
            windows,
            teacher,
            options,
            schemes,
            device=device,
            seed=seed,
            on_stage=on_stage,
            should_cancel=should_cancel,
            on_step=on_step,
            ranks=ranks,
        )
    return calibrated, stats


def _optimizer(
    grids: list[tuple[nn.Module, str, GridScales]], norms: list[FloatMaster], options: FinetuneOptions
) -> torch.optim.Adam | None:
    """Adam over the norms' float32 copies (at ``norm_lr``) and the grids' step sizes (at ``lr``)."""
    groups = [{"params": [norm.master for norm in norms], "lr": options.norm_lr}] if norms else []
    groups += [{"params": [g.theta for _, _, g in grids], "lr": options.lr}] if grids else []
    return torch.optim.Adam(groups) if groups else None


def student_outputs(model: nn.Module, ids: Tensor, head: Callable[[Tensor], Tensor], autocast: Any) -> ModelOutputs:
    """The student's last hidden states (in float32 whatever the autocast computed) and its output layer,
    which the loss applies a chunk of positions at a time under the same autocast."""
    with autocast():
        hidden = last_hidden_state(model, ids)
    return ModelOutputs(None, hidden.float(), _head_in(head, autocast, hidden.dtype))


def _head_in(head: Callable[[Tensor], Tensor], autocast: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def logits(chunk: Tensor) -> Tensor:  # from the float32 copy, in the dtype the model computed it in
        with autocast():
            return head(chunk.to(dtype))

    return logits


def batch_outputs(
    model: nn.Module,
    windows: Tensor,
    teacher: Tensor,
    idx: Tensor,
    head: Callable[[Tensor], Tensor],
    autocast: Any,
    device: str,
    ranks: Ranks,
    anchor: Tensor,
) -> tuple[ModelOutputs, ModelOutputs]:
    """The student's and the teacher's outputs on the step's windows ``idx``.

    On several ranks ``teacher`` holds this rank's share of the windows; each rank runs the student on
    the windows of the batch it holds, and both outputs are gathered whole on every rank
    (:class:`~quant_core.distributed.HeldBatch`; ``anchor`` is a trained parameter), so every rank
    computes the one-process loss of the whole batch.
    """
    start = ranks.bounds(windows.shape[0])[ranks.rank][0]
    batch = HeldBatch(ranks, windows.shape[0], idx, teacher[:0])
    hidden, dtype = None, torch.float32
    if batch.mine.numel():
        with autocast():
            computed = last_hidden_state(model, windows[start + batch.mine].to(device))
        hidden, dtype = computed.float(), computed.dtype
    student = ModelOutputs(None, batch.whole(hidden, anchor), _head_in(head, autocast, ranks.leaders_dtype(dtype)))
    return student, ModelOutputs(None, batch.whole(teacher).to(device), head)


def run_schedule(
    options: FinetuneOptions,
    windows: int,
    seed: int,
    optimizer: torch.optim.Optimizer,
    step: Callable[[int, Tensor], float],
    progress: PhaseProgress,
    loss_name: str,
    should_cancel: Callable[[], bool] | None,
    on_step: Callable[[int, int, float], None] | None,
) -> list[float]:
    """Every tuning step in order, in memory or streamed: ``options.epochs`` passes over ``windows`` windows
    in a seeded shuffle, a batch a step; before each step a cancel check and the learning rates on the
    cosine schedule, then ``step(index, window indices)``, which returns its loss. Each epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    per_epoch, steps = math.ceil(windows / options.batch_size), options.steps(windows)
    epoch_losses = []
    for epoch in range(options.epochs):
        total = 0.0
        for batch, idx in enumerate(torch.randperm(windows, generator=generator).split(options.batch_size)):
            index = epoch * per_epoch + batch
            if should_cancel is not None and should_cancel():
                raise CancelledError(f"cancelled at end-to-end tuning step {index} of {steps}")
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * cosine_with_warmup(index, 0, steps)
            loss = step(index, idx)
            total += loss
            progress.advance(index + 1)
            if on_step is not None:
                on_step(index + 1, steps, loss)
        epoch_losses.append(total / per_epoch)
        progress.report(f"{progress.label}: epoch {epoch + 1}/{options.epochs}, {loss_name} {total / per_epoch:.4g}")
    return epoch_losses


def tune_end_to_end(
    model: nn.Module,
    windows: Tensor,
    teacher: Tensor,
    options: FinetuneOptions,
    schemes: LayerSchemes,
    *,
    device: str = "cpu",
    seed: int = 0,
    on_stage: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    ranks: Ranks = SOLO,
) -> dict[str, Any]:
    """Train step sizes and norms of the quantized ``model`` to match the full-precision last hidden
    states ``teacher`` (:func:`record_teacher`) and the logits they give; codes stay fixed. On several
    ``ranks`` each step's windows are split over them (:func:`batch_outputs`) and ``teacher`` holds
    this rank's share of the windows.

    Returns the report's statistics: what was trained, the loss before the first and after the last
    step (mean per epoch), and the time per step. ``on_step(done, steps, loss)`` follows every step.
    """
    loss_fn = build_loss(options.loss, seed=seed)
    compute_dtype, device_type = tuning_dtype(options, device), torch.device(device).type
    model.eval().requires_grad_(False)
    nn.Module.to(model, device)
    grids, norms = _tunable(model, schemes)
    head = output_layer(model, "finetune.epochs")
    optimizer = _optimizer(grids, norms, options)
    if optimizer is None:
        nn.Module.to(model, "cpu")
        return {"skipped": "nothing to tune: no grid linear and no normalization weight"}
    autocast = partial(torch.autocast, device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    steps = options.steps(windows.shape[0])
    progress = PhaseProgress("end-to-end tuning", steps, "steps", on_stage or (lambda _: None))
    shares: dict[str, dict[str, float]] = {}  # each loss term's share of the gradient, first and last step
    trained = [p for group in optimizer.param_groups for p in group["params"]]

    def step(index: int, idx: Tensor) -> float:
        for norm in norms:
            norm.attach()
        student, taught = batch_outputs(model, windows, teacher, idx, head, autocast, device, ranks, anchor=trained[0])
        terms = loss_fn.model_terms(student, taught)
        return take_step(terms, optimizer, trained, (index, steps), shares, f"end-to-end tuning step {index}", ranks)

    try:
        with recomputed_blocks(model, grids):
            epoch_losses = run_schedule(
                options, windows.shape[0], seed, optimizer, step, progress, loss_fn.name, should_cancel, on_step
            )
    finally:
        _restore(grids, norms)
        nn.Module.to(model, "cpu")
    return {
        "loss": loss_fn.name,
        "epochs": options.epochs,
        "steps": steps,
        "windows": windows.shape[0],
        "grid_linears": len(grids),
        "norm_tensors": len(norms),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "epoch_losses": epoch_losses,
        **({"gradient_share": shares} if shares else {}),
        "seconds_per_step": (progress.clock() - progress.started) / max(steps, 1),
    }
