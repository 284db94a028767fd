"""DiscQuant: round every weight up or down so that the whole model's next-token distributions survive.

Chee, Backurs, Heck, Zhang, Kulkarni, Rothvoss, Gopi, "DiscQuant: A Quantization Method for Neural
Networks Inspired by Discrepancy Theory" (2025). Sec. 3 shows that, when the model's gradients are
close to low rank, all but a few weights can be rounded without changing the model's outputs much,
by walking inside the polytope of roundings towards a vertex. Sec. 4 turns this into the algorithm:

- Every weight ``w`` lies between its grid point below and above; ``x`` in ``[0, 1]`` interpolates
  between them, ``w(x) = down + x * (up - down)``, and ``y`` is the ``x`` that gives back ``w``.
  Any grid that yields ``down`` and ``up`` works; here it is the uniform grid of
  :mod:`quant_core.quantizer` (per channel or grouped), fixed from the float weights.
- The objective is knowledge distillation, the KL divergence between the full-precision model's
  next-token distributions and the interpolated model's, averaged over tokens, plus the linear term
  ``<1 - 2y, x>``, which is smallest at the vertex nearest to ``y`` (round-to-nearest). Following the
  authors' code, the distillation gradient is divided by ``delta2`` (12 times the mean squared
  round-to-nearest error, averaged over layers, so ``rho`` does not depend on the grid's scale),
  multiplied by ``rho`` and clamped entry-wise to ``[-clamp, clamp]`` before the linear term's
  gradient is added.
- AdamW with linear warm-up and a cosine schedule, gradient accumulation, and after every step the
  projection of ``x`` back onto ``[0, 1]``. Most ``x`` end at a corner; the few that do not are then
  rounded greedily (to the nearer corner), and the weight is exactly on the grid.

The greedy rounding of the original weights (``early_save: greedy``, the paper's "Greedy" baseline)
picks the nearer of the two grid points: it is round-to-nearest. With ``incoherence: hadamard`` the
grid and ``x`` live in QuIP's rotated basis (:mod:`quant_core.incoherence`), and the model uses
``U^T w(x) V``.

Unlike the blockwise methods this trains the whole model against itself at full precision, so it
needs the whole model, ``x`` and its AdamW state, and a whole-model backward pass in memory at once;
:meth:`DiscQuant.check_resources` estimates that and refuses a job the worker cannot hold. On several
ranks every rank holds all of that (data parallelism, as DDP) and runs its share of each step's
forwards; the gradients are summed before the clamp.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from quant_core.distributed import SOLO, Ranks
from quant_core.errors import CancelledError, ConfigError
from quant_core.incoherence import LinearRotation, restore_rotation
from quant_core.losses import ModelOutputs
from quant_core.method_options import DiscQuantOptions
from quant_core.methods.base import QuantMethod, register_method, write_dequantized, write_quantized
from quant_core.methods.training import cosine_with_warmup
from quant_core.model_structure import LinearLike, find_decoder_blocks, quantizable_linears, text_config, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, group_columns, scale_and_zero, ungroup_columns

CORNER_TOLERANCE = 1e-2  # an x this close to 0 or 1 counts as "near a corner" (the authors' count)
GIB = 2**30


@dataclass
class GridNeighbours:
    """Each weight's grid point below (``low``) and above (``high``) as codes, and where it lies between.

    ``fraction`` is ``y`` of the paper, in ``[0, 1)``; where clamping leaves a single grid point
    (``high == low``, the ends of the range) it is 0 and ``x`` has no effect.
    """

    low: Tensor  # [out, in] integer codes as floats
    high: Tensor
    fraction: Tensor
    floor: Tensor  # [out, in] floor(w / scale), before the zero point and clamping
    scale: Tensor  # [out, groups, 1]
    zero: Tensor
    spec: QuantSpec

    def weight(self, codes: Tensor) -> Tensor:
        """``[out, in]`` weights of the given codes, through the grid's own dequantization."""
        grouped = group_columns(codes, self.spec.group_size)
        return ungroup_columns(dequantize(grouped, self.scale, self.zero), codes.shape[1])

    def rounded(self, x: Tensor) -> Tensor:
        """Codes with each ``x`` rounded to its nearer corner: ``round(floor + x) + zero``, clamped.

        At a corner this is ``low`` or ``high``; at ``x = y`` it is exactly round-to-nearest, ties to
        even included, because ``floor + y`` gives back ``w / scale`` without rounding error.
        """
        position = group_columns(self.floor + x.to(self.floor), self.spec.group_size)
        codes = (torch.round(position) + self.zero).clamp(self.spec.qmin, self.spec.qmax)
        return ungroup_columns(codes, x.shape[1])


def grid_neighbours(weight: Tensor, spec: QuantSpec) -> GridNeighbours:
    """Round-down and round-up codes of an ``[out, in]`` float weight on its round-to-nearest grid.

    In code units ``t = w / scale``: ``low = floor(t) + zero`` and ``high = low + 1``, both clamped to
    the code range, and ``y = t - floor(t)`` (exact in floating point).
    """
    grouped = group_columns(weight, spec.group_size)
    scale, zero = scale_and_zero(grouped, spec)
    t = grouped / scale
    floor = torch.floor(t)
    low = (floor + zero).clamp(spec.qmin, spec.qmax)
    high = (floor + 1 + zero).clamp(spec.qmin, spec.qmax)
    fraction = torch.where(high > low, t - floor, torch.zeros_like(t))
    width = weight.shape[1]
    return GridNeighbours(
        ungroup_columns(low, width),
        ungroup_columns(high, width),
        ungroup_columns(fraction, width),
        ungroup_columns(floor, width),
        scale,
        zero,
        spec,
    )


class RoundingLinear(nn.Module):
    """A linear layer whose weight is ``down + x * gap`` with a trainable ``x`` in ``[0, 1]`` (Sec. 4).

    The wrapped layer keeps its float weight, frozen: with ``teacher`` set the layer computes at full
    precision, which is how the same model serves as its own distillation teacher.
    """

    down: Tensor
    gap: Tensor
    fraction: Tensor  # y: where the weight lies between its two grid neighbours

    def __init__(
        self,
        layer: LinearLike,
        spec: QuantSpec,
        init: str,
        generator: torch.Generator,
        rotation: LinearRotation | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.spec, self.rotation = layer, spec, rotation
        self.teacher = False
        weight = weight_matrix(layer).detach().float()
        if rotation is not None:
            weight = rotation.rotate(weight)
        grid = grid_neighbours(weight, spec)
        self.register_buffer("down", grid.weight(grid.low), persistent=False)
        self.register_buffer("gap", grid.weight(grid.high) - self.down, persistent=False)
        self.register_buffer("fraction", grid.fraction, persistent=False)  # y
        start = torch.rand(weight.shape, generator=generator) if init == "rand" else grid.fraction.detach().clone()
        self.x = nn.Parameter(start.to(weight.device))

    def student_matrix(self, x: Tensor | None = None) -> Tensor:
        """``[out, in]`` weight at ``x`` (default: the trained one), in the original basis and dtype."""
        matrix = self.down + (self.x if x is None else x) * self.gap
        if self.rotation is not None:
            matrix = restore_rotation(matrix, self.rotation)
        return matrix.to(self.layer.weight.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.teacher:
            return self.layer(hidden)
        return F.linear(hidden, self.student_matrix(), self.layer.bias)

    @torch.no_grad()
    def pull(self) -> Tensor:
        """``1 - 2y``: the gradient of the linear term ``<1 - 2y, x>``, smallest at the corner nearest to ``y``."""
        return 1.0 - 2.0 * self.fraction

    @torch.no_grad()
    def greedy_error_sq(self) -> Tensor:
        """Mean squared round-to-nearest error of the (rotated) weight: ``min(y, 1 - y)^2 gap^2``."""
        return (torch.minimum(self.fraction, 1 - self.fraction) * self.gap).square().mean()

    @torch.no_grad()
    def final_codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Codes with every ``x`` rounded to its nearer corner, and the grid ``(scale, zero)`` as ``[out, groups]``."""
        weight = weight_matrix(self.layer).detach().float()
        if self.rotation is not None:
            weight = self.rotation.rotate(weight)
        grid = grid_neighbours(weight, self.spec)
        return grid.weight(grid.rounded(x)), grid.scale.squeeze(-1), grid.zero.squeeze(-1)


@dataclass
class MemoryEstimate:
    """Bytes a DiscQuant run holds at its peak, by what holds them."""

    teacher_weights: int  # every parameter of the model at full precision (the student has no copy)
    grid: int  # down, gap and y: three floats per quantized weight
    rounding_state: int  # x, its gradient and AdamW's two moments: four floats per quantized weight
    student_weights: int  # the interpolated weights kept by autograd for backward (and rotation copies)
    activations: int  # what one micro-batch's backward needs (all layers, or one with checkpointing)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, float]:
        return {**{k: v / GIB for k, v in asdict(self).items()}, "total": self.total / GIB}


def _config_value(config: Any, names: tuple[str, ...], default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ConfigError(f"cannot read {names[0]} from the model config to estimate DiscQuant's memory", "model")
    return default


def estimate_memory(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    grad_checkpoint: bool,
    quantized_numel: int,
    rotate: bool = False,
) -> MemoryEstimate:
    """What training needs: weights, rounding state, and a micro-batch's saved activations.

    Per decoder layer and token the backward pass keeps about 16 hidden-sized and 4 MLP-sized
    vectors and two heads x seq attention rows; the head keeps six float32 copies of the logits
    (both models' logits and log-probabilities, the student's two gradients). With gradient
    checkpointing only each layer's input is kept, plus one layer recomputed at a time. Undoing
    the rotations (``rotate``) costs about two more floats per quantized weight in transient
    copies (measured on SmolLM2-135M: 6.9 GiB peak against 5.9 GiB without).
    """
    config = text_config(model)
    hidden = _config_value(config, ("hidden_size", "n_embd", "d_model"))
    intermediate = _config_value(config, ("intermediate_size", "ffn_dim", "n_inner"), 4 * hidden)
    heads = _config_value(config, ("num_attention_heads", "n_head"))
    layers = _config_value(config, ("num_hidden_layers", "n_layer"))
    vocab = _config_value(config, ("vocab_size",))
    element = next(model.parameters()).element_size()
    tokens = batch_size * seq_len
    per_layer = tokens * (16 * hidden + 4 * intermediate) * element + 2 * batch_size * heads * seq_len**2 * element
    kept = layers * tokens * hidden * element + per_layer if grad_checkpoint else layers * per_layer
    unique = {id(p): p for p in model.parameters()}.values()
    return MemoryEstimate(
        teacher_weights=sum(p.numel() * p.element_size() for p in unique),
        grid=3 * 4 * quantized_numel,
        rounding_state=4 * 4 * quantized_numel,
        student_weights=(element + (8 if rotate else 0)) * quantized_numel,
        activations=kept + 6 * 4 * tokens * vocab,
    )


def host_available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextmanager
def _without_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout off while the blocks run in training mode (gradient checkpointing needs that mode)."""
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        for name in ("p", "attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0 and (name != "p" or isinstance(module, nn.Dropout)):
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _set_checkpointing(module: nn.Module, enable: bool) -> None:
    """The model's own activation (gradient) checkpointing: each block's activations are recomputed in backward."""
    model = cast(PreTrainedModel, module)  # the pipeline hands whole-model methods a transformers model
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


WrappedLinear = tuple[nn.Module, str, RoundingLinear]  # the block, the linear's name in it, its wrapper


def wrap_linears(
    model: nn.Module, spec: QuantSpec, init: str, generator: torch.Generator, rotate: bool
) -> list[WrappedLinear]:
    """Put a :class:`RoundingLinear` in place of every quantizable linear of every decoder block.

    Draws from ``generator`` linear by linear in the model's order: ``U``'s then ``V``'s signs (when
    rotating), then the random ``x`` (``init: rand``).
    """
    wrapped = []
    for block in find_decoder_blocks(model):
        for name, layer in quantizable_linears(block).items():
            out_features, in_features = weight_matrix(layer).shape
            rotation = LinearRotation.draw(out_features, in_features, generator) if rotate else None
            wrapper = RoundingLinear(layer, spec, init, generator, rotation)
            _set_submodule(block, name, wrapper)
            wrapped.append((block, name, wrapper))
    return wrapped


def unwrap_linears(wrapped: list[WrappedLinear]) -> None:
    """Put the original linears back in place of their wrappers."""
    for block, name, wrapper in wrapped:
        _set_submodule(block, name, wrapper.layer)


@register_method
class DiscQuant(QuantMethod):
    options_type = DiscQuantOptions
    options: DiscQuantOptions

    def _quantized_numel(self, model: nn.Module) -> int:
        blocks = find_decoder_blocks(model)
        return sum(weight_matrix(m).numel() for block in blocks for m in quantizable_linears(block).values())

    def check_resources(self, model: nn.Module, seq_len: int, device: str, sharing: int = 1) -> dict[str, Any]:
        """Estimate the memory training needs and refuse the job up front if the worker lacks it.

        Compared with ``memory_budget_gib`` when set, else with the free GPU memory on CUDA, else with
        the host's available memory plus the model already loaded (it is part of the estimate), divided
        among the ``sharing`` ranks that each hold a copy in that memory (a job's CPU ranks).
        """
        if self.options.early_save == "greedy":
            return {"memory_estimate_gib": None}
        estimate = estimate_memory(
            model,
            self.options.batch_size,
            seq_len,
            self.options.grad_checkpoint,
            self._quantized_numel(model),
            self.rotates,
        )
        field = "model"
        available: float | None
        if self.options.memory_budget_gib is not None:
            available, source = self.options.memory_budget_gib * GIB, "memory_budget_gib"
            field = "method_options.memory_budget_gib"
        elif device.startswith("cuda"):
            available, source = torch.cuda.mem_get_info(torch.device(device))[0], f"free memory of {device}"
        else:
            free = host_available_bytes()
            available = None if free is None else free / sharing + estimate.teacher_weights
            source = "host MemAvailable plus the loaded model" + (f", shared by {sharing} ranks" if sharing > 1 else "")
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in estimate.to_dict().items() if k != "total")
        if available is not None and estimate.total > available:
            raise ConfigError(
                f"discquant trains the whole model at once and needs about {estimate.total / GIB:.3g} GiB "
                f"({parts} GiB), but {available / GIB:.3g} GiB is available ({source}); lower calibration.seq_len or "
                "method_options.batch_size, set method_options.grad_checkpoint: true, or use a worker with more memory",
                field,
            )
        return {
            "memory_estimate_gib": estimate.to_dict(),
            "memory_available_gib": None if available is None else available / GIB,
            "memory_source": source,
        }

    def quantize_model(
        self,
        model: nn.Module,
        windows: Tensor,
        *,
        device: str = "cpu",
        seed: int = 0,
        on_stage: Callable[[str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        ranks: Ranks = SOLO,
    ) -> dict[str, Any]:
        """Train ``x`` for every quantized linear of ``model`` on ``windows`` and write the rounded weights."""
        options = self.options
        stats: dict[str, Any] = self.check_resources(model, windows.shape[1], device, ranks.world_size)
        generator = torch.Generator().manual_seed(seed)
        model.to(device).eval().requires_grad_(False)
        wrapped = wrap_linears(model, self.spec, options.init, generator, self.rotates)
        wrappers = [wrapper for _, _, wrapper in wrapped]
        try:
            if options.early_save == "greedy":
                final_x = [wrapper.fraction for wrapper in wrappers]  # rounding y itself: round-to-nearest
                stats.update(steps=0, early_save="greedy")
            else:
                stats.update(
                    self.train(
                        wrappers, model, windows, device, generator, on_stage, should_cancel, seed=seed, ranks=ranks
                    )
                )
                final_x = [wrapper.x.detach() for wrapper in wrappers]
        finally:
            unwrap_linears(wrapped)
        changed, total = 0, 0
        for block in find_decoder_blocks(model):
            on_grid, rotated = {}, {}
            for (owner, name, wrapper), x in zip(wrapped, final_x, strict=True):
                if owner is not block:
                    continue
                matrix, scale, zero = wrapper.final_codes(x)
                changed += int((matrix != wrapper.final_codes(wrapper.fraction)[0]).sum())
                total += matrix.numel()
                dtype = wrapper.layer.weight.dtype
                if wrapper.rotation is not None:
                    rotated[name] = wrapper.rotation.restore(matrix).to(dtype)
                else:
                    on_grid[name] = (matrix.to(dtype), scale, zero)
            write_quantized(block, on_grid)
            write_dequantized(block, rotated)
        stats["fraction_rounded_away_from_nearest"] = changed / max(total, 1)
        model.to("cpu")
        return stats

    def train(
        self,
        wrappers: list[RoundingLinear],
        model: nn.Module,
        windows: Tensor,
        device: str,
        generator: torch.Generator,
        on_stage: Callable[[str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        *,
        seed: int = 0,
        ranks: Ranks = SOLO,
    ) -> dict[str, Any]:
        """Minimize the objective over every wrapper's ``x`` (Sec. 4); ``x`` stays in ``[0, 1]`` throughout.

        On several ``ranks`` (each with the whole model) a step's forwards are shared out, a
        contiguous share to each rank, and the gradients summed before the clamp, as DDP would: each
        forward's loss is a term of its own, so this is the one-process step. A loss with random
        directions draws them from the seed and the forward's number, whichever rank runs it; learned
        SW directions keep climbing from forward to forward (on each rank, over the forwards it runs).
        """
        options = self.options
        per_step = options.batch_size * options.grad_accum
        n_samples = options.n_samples or windows.shape[0]
        steps = max(1, math.ceil(n_samples / per_step))
        warmup = options.warmup if options.warmup is not None else steps // 8
        order = torch.cat(
            [
                torch.randperm(windows.shape[0], generator=generator)
                for _ in range(math.ceil(steps * per_step / windows.shape[0]))
            ]
        )
        delta2 = max(float(torch.stack([w.greedy_error_sq() for w in wrappers]).mean()) * 12, 1e-20)
        parameters = [w.x for w in wrappers]
        optimizer = torch.optim.AdamW(parameters, lr=options.lr, betas=(0.9, 0.999), weight_decay=options.weight_decay)
        needs_hidden = self.loss.needs_hidden_states
        if options.grad_checkpoint:
            _set_checkpointing(model, True)
        curve: list[float] = []
        started = time.perf_counter()
        try:
            with _without_dropout(model):
                model.train(options.grad_checkpoint)
                for step in range(steps):
                    if should_cancel is not None and should_cancel():
                        raise CancelledError(f"cancelled at DiscQuant step {step} of {steps}")
                    for group in optimizer.param_groups:
                        group["lr"] = options.lr * cosine_with_warmup(step, warmup, steps)
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for micro in range(*ranks.bounds(options.grad_accum)[ranks.rank]):
                        forward = step * options.grad_accum + micro
                        self.loss.reseed(seed + forward, keep_learned=forward > 0)
                        start = forward * options.batch_size
                        ids = windows[order[start : start + options.batch_size]].to(device)
                        teacher = self._outputs(model, wrappers, ids, needs_hidden, teacher=True)
                        student = self._outputs(model, wrappers, ids, needs_hidden, teacher=False)
                        loss = self.loss.model_objective(student, teacher)
                        (loss / (options.grad_accum * delta2)).backward()
                        step_loss += loss.item() / options.grad_accum
                    step_loss = ranks.total(step_loss)
                    ranks.sum_gradients(parameters)
                    with torch.no_grad():
                        for wrapper in wrappers:
                            grad = wrapper.x.grad if wrapper.x.grad is not None else torch.zeros_like(wrapper.x)
                            wrapper.x.grad = (grad * options.rho).clamp(-options.clamp, options.clamp) + wrapper.pull()
                    optimizer.step()
                    with torch.no_grad():
                        for x in parameters:
                            x.clamp_(0.0, 1.0)
                    curve.append(step_loss)
                    if on_stage is not None and (step + 1) % max(1, steps // 10) == 0:
                        on_stage(f"discquant step {step + 1}/{steps}: {self.loss.name} {step_loss:.4g}")
        finally:
            if options.grad_checkpoint:
                _set_checkpointing(model, False)
            model.eval()
        schedule = {"steps": steps, "warmup": warmup, "samples": steps * per_step, "delta2": delta2}
        return {**schedule, **_training_summary(curve, parameters, (time.perf_counter() - started) / steps)}

    @staticmethod
    def _outputs(
        model: nn.Module, wrappers: list[RoundingLinear], ids: Tensor, needs_hidden: bool, teacher: bool
    ) -> ModelOutputs:
        """One forward of the student (with gradient) or of the full-precision teacher (without)."""
        for wrapper in wrappers:
            wrapper.teacher = teacher
        with torch.no_grad() if teacher else torch.enable_grad():
            out = model(input_ids=ids, use_cache=False, output_hidden_states=needs_hidden)
        return ModelOutputs(out.logits, out.hidden_states[-1] if needs_hidden else None)


def _training_summary(curve: list[float], parameters: Sequence[Tensor], seconds_per_step: float) -> dict[str, Any]:
    """The loss curve and how far the relaxed roundings went to the grid's corners (Sec. 4: the
    rounding is read off at the end, so the share already at or near a corner says how much it decides)."""
    x_all = torch.cat([x.detach().flatten() for x in parameters])
    return {
        "loss_first": curve[0],
        "loss_final": curve[-1],
        "loss_curve": curve,
        "fraction_at_corners": float(((x_all == 0) | (x_all == 1)).float().mean()),
        "fraction_near_corners": float(((x_all - x_all.round()).abs() <= CORNER_TOLERANCE).float().mean()),
        "seconds_per_step": seconds_per_step,
    }
