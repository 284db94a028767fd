"""GPTQ: quantize one column at a time and spread each column's rounding error over the rest.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023). For a linear with inputs ``X`` the layer-output error is a quadratic form in the weight
error with Hessian ``H = 2 X^T X / n``. Walking the columns in order, each is rounded onto the grid
and the remaining columns are corrected by the error times a row of the upper Cholesky factor of
``H^-1`` (the optimal brain surgeon update). Corrections are applied lazily, ``block_size`` columns
at a time, which is what makes it fast.

- Damping: ``damp * mean(diag H)`` is added to the diagonal; if the Cholesky factorization still
  fails, the damping grows tenfold up to ``MAX_DAMP_RETRIES`` times before giving up with a clear error.
- Act-order: columns with the largest ``H_ii`` go first. Groups stay the contiguous column ranges of
  the uniform grid (the layout the export packs), so a group's scale and zero are fixed either from
  the original weights (``static_groups``) or from the error-corrected weights when the first of its
  columns is reached.
- True-sequential: linears that share an input are one stage and one Hessian; stages run in the
  block's order, and each stage's Hessian is computed with the earlier stages already quantized.
  One pass of the block, suspended before each stage (:mod:`quant_core.methods.staged_pass`),
  collects every stage's inputs and yields the block's output (``staged_pass``; by default on a GPU
  and on a CPU with one intra-op thread, where it is faster than the replay; with several CPU
  threads each paused batch's thread brings its own OpenMP team and the pass is slower, so the
  default there is the replay; timings in bench/HISTORY.md, "Passes over the calibration windows per
  block"; ``staged_pass: false`` replays the block up to each stage instead: about 1.7 more passes
  of a Llama block, and less memory).
  ``true_sequential: false`` takes every Hessian from one pass of the full-precision block, as
  llm-compressor's GPTQ does, and then needs a second pass for the output.
- Clipping (``clip_search``, needs static groups): each row and group's range is shrunk by the ratio
  that minimises its output error under the stage's Hessian (:mod:`quant_core.clip_search`) before
  the grid is fixed; the column walk then compensates the clipped weights' error like any other.
  The search judges each group alone, with round-to-nearest; where the walk's compensation meets
  weights the search clipped (channels with massive activations, as in Qwen2.5), the clipped grid
  can end worse than the full range, even worse than round-to-nearest. So the stage is walked from
  both grids and keeps the one with the smaller GPTQ objective (the stage's output error under its
  Hessian); the report's ``clipped`` says which won per stage. The price is a second column walk.
- Asymmetric calibration (``match_float``): a stage's inputs ``X`` carry the error of every layer
  quantized before it, and plain GPTQ matches the float weights on them, ``W X``. With the
  full-precision inputs ``X_fp`` recorded on the engine's full-precision pass, GPTQ instead starts
  from the weight that best gives the float model's own output ``W X_fp`` on ``X``
  (:func:`float_target_weight`), so each stage also absorbs what came before it. The fit is pulled
  toward the float weights by ``match_float_damp``; fitted freely on 16 calibration windows it
  overfits the calibration text (bench/HISTORY.md).
- Incoherence (``incoherence: hadamard``, QuIP Sec. 4): each stage's weights are quantized as
  ``U W V^T`` against the rotated Hessian ``V H V^T`` (one ``V`` per stage, as its linears share an
  input; one ``U`` per linear), and ``U^T Q V`` is written back (:mod:`quant_core.incoherence`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.clip_search import search_clipping
from quant_core.distributed import SOLO, Ranks
from quant_core.incoherence import LinearRotation, RandomizedHadamard, rotate_hessian
from quant_core.method_options import GptqOptions
from quant_core.methods.base import (
    BlockData,
    QuantMethod,
    register_method,
    stage_scheme,
    write_quantized,
    write_rotated,
)
from quant_core.methods.layer_inputs import input_grams, input_groups, layer_input
from quant_core.methods.staged_pass import staged_pass
from quant_core.model_structure import quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, grid_params

MAX_DAMP_RETRIES = 6


@dataclass
class GptqBlock:
    """What quantizing one block left: where refinement starts, GPTQ's objective, and maybe the output.

    ``compensated`` holds each linear's error-compensated weight (in the rotated basis under
    incoherence): rounding it to nearest gives GPTQ's codes, which is where refinement methods start.
    ``errors`` is GPTQ's objective per stage; ``outputs`` the block's output on every calibration
    input with all stages quantized, when the staged pass computed it on the way.
    """

    compensated: dict[str, Tensor]
    errors: dict[str, float]
    outputs: Tensor | None
    clipped: dict[str, bool] = field(default_factory=dict)  # per stage: whether the searched clipping won


def _group_index(in_features: int, spec: QuantSpec) -> Tensor:
    """Each input column's group on the uniform grid (contiguous runs of ``group_size``)."""
    columns = torch.arange(in_features)
    return torch.zeros_like(columns) if spec.group_size is None else columns // spec.group_size


def _factor_inverse(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, damping more when it is not positive definite."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damped = hessian.clone()
        damped[diag, diag] += damp * 10**attempt * mean_diag
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise FloatingPointError(f"GPTQ: the Hessian is not positive definite even with damping {damp * 10**attempt}")


@dataclass
class GptqResult:
    weight: Tensor  # [out, in], on the grid
    scale: Tensor  # [out, groups]
    zero: Tensor  # [out, groups]
    error: float
    compensated: Tensor  # [out, in]: each column with the earlier columns' errors pushed on it, just before rounding


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip: Tensor | None = None,
) -> GptqResult:
    """GPTQ-quantized ``[out, in]`` weight, its grid, and the Hessian-weighted error it leaves.

    The error is ``sum_i (w_i - q_i)^2 / [H^-1]_ii / 2`` over rounded columns, the quantity GPTQ's
    updates minimize; it is zero only if the weight was already on the grid. ``clip`` (``[out, groups,
    1]`` ratios) shrinks the ranges of static groups before their grid is fixed.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()
    in_features = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = _group_index(in_features, spec).to(w.device)
    num_groups = int(groups.max()) + 1
    scale = torch.zeros(w.shape[0], num_groups, dtype=dtype, device=w.device)
    zero = torch.zeros_like(scale)
    ready = torch.zeros(num_groups, dtype=torch.bool)
    if static_groups or spec.group_size is None:
        scale, zero = grid_params(w, spec, clip, clip)
        ready[:] = True
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_features, device=w.device)
    w, h = w[:, order], h[order][:, order]
    position = torch.empty_like(order)
    position[order] = torch.arange(in_features, device=w.device)
    h_inv = _factor_inverse(h, damp)
    quantized = torch.zeros_like(w)
    compensated = torch.zeros_like(w)
    error_total = torch.zeros((), dtype=dtype, device=w.device)
    column_order, column_group = order.tolist(), groups.tolist()  # no device sync per column
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            group = column_group[column_order[start + i]]
            if not ready[group]:
                members = position[groups == group]  # this group's columns, none quantized yet
                inside = members < end
                current = w[:, members] - errors[:, :i] @ h_inv[start : start + i, members]  # pending updates
                current[:, inside] = w_block[:, members[inside] - start]
                group_scale, group_zero = grid_params(current, QuantSpec(spec.bits, spec.symmetric, None))
                scale[:, group], zero[:, group] = group_scale[:, 0], group_zero[:, 0]
                ready[group] = True
            col = w_block[:, i]
            codes = (torch.round(col / scale[:, group]) + zero[:, group]).clamp(spec.qmin, spec.qmax)
            q = dequantize(codes, scale[:, group], zero[:, group])
            quantized[:, start + i] = q
            compensated[:, start + i] = col
            d = h_inv_block[i, i]
            err = (col - q) / d
            error_total += ((col - q) ** 2).sum() / d**2 / 2
            w_block[:, i:] -= err.unsqueeze(1) @ h_inv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GptqResult(
        quantized[:, position].to(weight.dtype), scale, zero, float(error_total), compensated[:, position].float()
    )


@dataclass
class StageInputs:
    """What GPTQ needs of a stage's inputs ``X`` (each row a token), both scaled by ``2 / n``.

    ``hessian`` is ``X^T X``; ``shift`` is ``(X_fp - X)^T X``, where ``X_fp`` is what the stage
    receives in the full-precision model, or None when GPTQ matches the float weights on ``X``.
    """

    hessian: Tensor
    shift: Tensor | None = None


def stage_inputs_of(inputs: Iterable[Tensor], float_inputs: Tensor | None = None, ranks: Ranks = SOLO) -> StageInputs:
    """``StageInputs`` over every token of ``inputs`` (batches of one linear's input, in window order), in float32.

    ``float_inputs`` (``[windows, seq, in]``) pairs each of those tokens with its full-precision input.
    On several ``ranks``, ``inputs`` are this rank's share, and sums and token counts are over all ranks.
    """
    hessian = shift = torch.zeros(())
    count = 0
    for batch in inputs:
        x = batch.detach().float().reshape(-1, batch.shape[-1])
        hessian = hessian + x.T @ x
        if float_inputs is not None:
            paired = float_inputs[count // batch.shape[1] :][: batch.shape[0]].to(x.device, torch.float32)
            shift = shift + (paired.reshape_as(x) - x).T @ x
        count += x.shape[0]
    if count == 0:
        raise ValueError("GPTQ: a stage received no inputs")
    tokens = ranks.total(count)
    return StageInputs(
        ranks.sum(hessian) * (2.0 / tokens), None if float_inputs is None else ranks.sum(shift) * (2.0 / tokens)
    )


def float_target_weight(weight: Tensor, stage: StageInputs, damp: float) -> Tensor:
    """The ``[out, in]`` weight whose output on ``X`` best matches the float layer's output on ``X_fp``.

    Minimises ``|X Q^T - X_fp W^T|^2 + l |Q - W|^2`` with ``l`` ``damp`` times the mean Hessian
    diagonal, whose solution is ``W + W S (H + l I)^-1`` with ``S`` the stage's shift.
    Since the objective is that weight's own output error plus a constant, GPTQ run on it (with the
    same Hessian) minimises the error against the float model's outputs instead of against the float
    weights on already-perturbed inputs (asymmetric calibration, as in GPTAQ and Qronos). Without a
    shift the weight is returned unchanged.
    """
    if stage.shift is None:
        return weight
    hessian = stage.hessian.double()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damped = hessian + damp * hessian.diagonal().mean() * identity
    correction = torch.linalg.solve(damped, (weight.double() @ stage.shift.double()).T).T
    return (weight.double() + correction).to(weight.dtype)


@register_method
class Gptq(QuantMethod):
    options_type = GptqOptions
    options: GptqOptions

    @property
    def clips(self) -> bool:
        """Whether static group grids start from the searched clipping (the default whenever groups are static).

        What it gives GPTQ on SmolLM2-135M: bench/HISTORY.md, "Quality per CPU-minute".
        """
        return self.options.static_groups if self.options.clip_search is None else self.options.clip_search

    @property
    def needs_float_inputs(self) -> bool:
        return self.options.match_float

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        """Quantize stage by stage; ``error`` is GPTQ's own objective per stage, for the report."""
        result = self.quantize_block(block, data)
        if result.outputs is not None:
            data.keep_outputs(block, result.outputs)
        return {"error": result.errors, **({"clipped": result.clipped} if result.clipped else {})}

    @torch.no_grad()
    def quantize_block(self, block: nn.Module, data: BlockData) -> GptqBlock:
        """Write GPTQ's weights into the block, stage by stage in the order the block runs them.

        With ``true_sequential`` and ``staged_pass``, one pass of the block both collects each stage's
        inputs (the earlier stages already quantized) and yields the block's output; if that pass runs
        out of device memory, the remaining stages replay the block up to each stage instead.
        """
        stages = input_groups(block, data)
        result = GptqBlock({}, {}, None)
        batch_size = self.options.batch_size
        if not self.options.true_sequential:
            grams = input_grams(block, data, data.inputs, batch_size)
            tokens = data.ranks.total(data.inputs.shape[0] * data.inputs.shape[1])
            for stage in stages:
                self._quantize_stage(block, data, stage, StageInputs(grams[stage[0]] * (2.0 / tokens)), result)
            return result
        staged = self.options.staged_pass
        if staged is None:
            staged = data.inputs.device.type != "cpu" or torch.get_num_threads() == 1
        if staged:
            try:
                result.outputs = staged_pass(
                    block,
                    data,
                    stages,
                    lambda index, inputs: self._quantize_stage(
                        block, data, stages[index], self._stage_inputs(data, stages[index], inputs), result
                    ),
                    batch_size,
                )
                return result
            except torch.OutOfMemoryError:
                if data.inputs.device.type == "cuda":
                    torch.cuda.empty_cache()
        for stage in stages[len(result.errors) :]:
            inputs = (layer_input(block, data, hidden, stage[0]) for hidden in data.inputs.split(batch_size))
            self._quantize_stage(block, data, stage, self._stage_inputs(data, stage, inputs), result)
        return result

    def _walk(self, weight: Tensor, hessian: Tensor, spec: QuantSpec, clip: Tensor | None) -> GptqResult:
        """GPTQ's column walk over ``weight`` with this method's options, from ``clip``'s grid (None: full range)."""
        options = self.options
        return gptq_quantize(
            weight, hessian, spec, options.block_size, options.damp, options.act_order, options.static_groups, clip
        )

    def _walk_rows(self, weight: Tensor, hessian: Tensor, spec: QuantSpec, clipped: bool, ranks: Ranks) -> GptqResult:
        """The column walk of ``weight`` from the full range or the searched clipping, its rows split over ranks.

        Rows are independent in GPTQ (each row's corrections depend only on its own errors and the
        shared Hessian), so each rank walks its share and the results are gathered: the same result
        as one walk, in a world-size-th of the time.
        """
        rows = ranks.share(weight)
        clip = search_clipping(rows, hessian, spec)[0] if clipped else None
        walked = self._walk(rows, hessian, spec, clip)
        if not ranks.distributed:
            return walked
        total = weight.shape[0]
        return GptqResult(
            weight=ranks.gather_rows(walked.weight, total),
            scale=ranks.gather_rows(walked.scale, total),
            zero=ranks.gather_rows(walked.zero, total),
            error=ranks.total(walked.error),
            compensated=ranks.gather_rows(walked.compensated, total),
        )

    def _stage_inputs(self, data: BlockData, stage: tuple[str, ...], inputs: Iterable[Tensor]) -> StageInputs:
        """The stage's Hessian and, with ``match_float``, its inputs' shift from the full-precision ones."""
        if not self.options.match_float:
            return stage_inputs_of(inputs, ranks=data.ranks)
        return stage_inputs_of(inputs, torch.cat(data.float_linear_inputs[stage[0]]), data.ranks)

    def _quantize_stage(
        self, block: nn.Module, data: BlockData, stage: tuple[str, ...], inputs: StageInputs, result: GptqBlock
    ) -> None:
        """Quantize the linears of one stage (they share one Hessian) and record them in ``result``."""
        layers = quantizable_linears(block)
        hessian = inputs.hessian
        damp = self.options.match_float_damp
        spec = stage_scheme(self.block_schemes(block, data), stage)
        matrices = [float_target_weight(weight_matrix(layers[name]).detach(), inputs, damp) for name in stage]
        if self.rotates:
            in_rotation = RandomizedHadamard(hessian.shape[0], data.generator)  # the stage's shared V
            rotations = [LinearRotation(RandomizedHadamard(m.shape[0], data.generator), in_rotation) for m in matrices]
            hessian = rotate_hessian(hessian, in_rotation)
            matrices = [r.rotate(m.float()) for r, m in zip(rotations, matrices, strict=True)]
        weight = torch.cat(matrices)  # one Hessian for all linears that read this input
        quantized = self._walk_rows(weight, hessian, spec, False, data.ranks)
        if self.clips:
            clipped = self._walk_rows(weight, hessian, spec, True, data.ranks)
            result.clipped["+".join(stage)] = clipped.error < quantized.error
            quantized = min(quantized, clipped, key=lambda walked: walked.error)
        rows = [m.shape[0] for m in matrices]
        result.compensated.update(zip(stage, quantized.compensated.split(rows), strict=True))
        on_grid = zip(
            quantized.weight.split(rows), quantized.scale.split(rows), quantized.zero.split(rows), strict=True
        )
        if self.rotates:
            write_rotated(
                block,
                {
                    name: (r.restore(q).to(layers[name].weight.dtype), (scale, zero, r))
                    for name, r, (q, scale, zero) in zip(stage, rotations, on_grid, strict=True)
                },
            )
        else:
            write_quantized(block, dict(zip(stage, on_grid, strict=True)))
        result.errors["+".join(stage)] = quantized.error
