"""The Sliced-Wasserstein (SW) family: the distance, its samples, and the losses built on it.

SW projects two point clouds on unit directions and compares the sorted projections, so it measures
how far apart two *distributions* are, whatever the pairing of their points (Cao, Yin, Aref,
arXiv 2601.07878, Sec. 3). Random directions see a high-dimensional difference only where they happen
to point; the variants here, listed as future work in the paper's Sec. 6, choose directions with
more care:

- ``SlicedWassersteinLoss``: K fresh random directions at every call (the paper's loss);
- ``MaxSlicedLoss``: the K best of several random draws, then a few steps of gradient ascent on the
  sphere, so the loss looks where the two clouds differ most (max-sliced W, Deshpande et al. 2019,
  averaged over K directions);
- ``LearnedProjectionLoss``: directions that persist across the steps of a block and take one ascent
  step per call, an adversary that follows the quantized block as it trains at almost no extra cost;
- ``MultiScaleLoss``: the sum of SW at the token level and over blocks of b consecutive tokens, so
  single activations and short-range structure are both aligned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant_core.errors import ConfigError
from quant_core.loss_base import Loss, ModelOutputs, compute_dtype, tokens
from quant_core.loss_options import BLOCK_SIZE_ERROR, SCALE_ERROR

# Random candidates drawn per kept direction before max-sliced ascent starts from the best of them.
CANDIDATES_PER_DIRECTION = 4


def per_direction_distances(x: Tensor, y: Tensor, directions: Tensor, p: int = 1) -> Tensor:
    """The 1-D Wasserstein distance between the clouds' projections along each direction, ``[K]``.

    ``x`` and ``y`` are ``[N, D]`` samples with uniform weights, ``directions`` is ``[D, K]`` with unit
    columns. Each cloud is projected with one matrix product (no copy of the clouds, and no gradient
    work for a target that needs none) and its K projections are sorted as contiguous rows; the 1-D
    distance is the mean ``|difference|`` of sorted projections (``p=1``, W1) or its mean square
    (``p=2``, squared W2).
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [N, D] with equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions.ndim != 2 or directions.shape[0] != x.shape[1]:
        raise ValueError(f"directions must be [D, K] with D={x.shape[1]}, got {tuple(directions.shape)}")
    if p not in (1, 2):
        raise ValueError("p must be 1 or 2")
    x, y = compute_dtype(x), compute_dtype(y)
    directions_t = directions.to(x.dtype).T.contiguous()  # [K, D]: projections come out as [K, N] rows
    diff = (directions_t @ x.T).sort(dim=1).values - (directions_t @ y.T).sort(dim=1).values
    return diff.abs().mean(1) if p == 1 else diff.pow(2).mean(1)


def sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: int = 1) -> Tensor:
    """Sliced Wasserstein distance along the given directions: the mean of the per-direction distances."""
    return per_direction_distances(x, y, directions, p).mean()


def random_directions(dim: int, count: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` directions drawn uniformly on the unit sphere of R^dim, as the columns of [dim, count]."""
    gaussian = torch.randn(dim, count, generator=generator, device=generator.device, dtype=dtype)
    return gaussian / gaussian.norm(dim=0, keepdim=True)


def unit_columns(directions: Tensor) -> Tensor:
    return directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-12)


def ascend_directions(x: Tensor, y: Tensor, directions: Tensor, p: int, steps: int, step_size: float) -> Tensor:
    """``steps`` steps of gradient ascent of each direction's distance on the unit sphere.

    The clouds are detached: the directions adapt to the current outputs, while the model's gradient
    later flows through the distance along the final directions only. Each step moves a direction
    along its tangent gradient by an angle of about ``step_size / sqrt(t + 1)`` (normalised, so the
    step does not depend on the activations' scale), then back onto the sphere.
    """
    x, y = x.detach(), y.detach()
    current = directions.detach()
    for t in range(steps):
        with torch.enable_grad():
            theta = current.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(per_direction_distances(x, y, theta, p).sum(), theta)
        tangent = grad - (grad * current).sum(0, keepdim=True) * current
        norm = tangent.norm(dim=0, keepdim=True)
        move = torch.where(norm > 0, tangent / norm.clamp_min(1e-12), torch.zeros_like(tangent))
        current = unit_columns(current + step_size / math.sqrt(t + 1) * move)
    return current


def sw_samples(t: Tensor, block_size: int | None) -> Tensor:
    """The samples SW compares: tokens ``[B*S, D]``, or ``[B*S/b, b*D]`` blocks of b consecutive tokens."""
    if block_size is None:
        return tokens(t)
    if t.ndim != 3:
        raise ValueError(f"sw_block_size needs outputs shaped [batch, seq, hidden], got {tuple(t.shape)}")
    batch, seq, hidden = t.shape
    if seq % block_size:
        raise ConfigError(BLOCK_SIZE_ERROR, "sw_block_size")
    return t.reshape(batch * seq // block_size, block_size * hidden)


class SlicedWassersteinLoss(Loss):
    """SW between outputs and targets with K fresh directions per call from a seeded generator.

    Redrawing at every call covers more of the sphere over training than a fixed set, while the
    seeded generator keeps whole runs reproducible; one generator per device avoids host transfers.
    """

    name = "sliced_wasserstein"
    needs_hidden_states = True

    def __init__(self, num_projections: int, block_size: int | None, p: int, seed: int) -> None:
        self.num_projections, self.block_size, self.p = num_projections, block_size, p
        self.seed = seed
        self.block_sizes = () if block_size is None else (block_size,)
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int, keep_learned: bool = False) -> None:
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def directions(self, x: Tensor, y: Tensor) -> Tensor:
        """The ``[D, K]`` directions of this call: fresh random ones."""
        return random_directions(x.shape[1], self.num_projections, self.generator(x.device))

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        x, y = sw_samples(output, self.block_size), sw_samples(target, self.block_size)
        return sliced_wasserstein(x, y, self.directions(x, y), self.p)

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """Between whole models, SW compares the final hidden states."""
        if student.hidden is None or teacher.hidden is None:
            raise ValueError("the SW term of a whole-model objective needs both models' final hidden states")
        return self(student.hidden, teacher.hidden)


class MaxSlicedLoss(SlicedWassersteinLoss):
    """SW along the K directions that separate the clouds most: max-sliced W averaged over K.

    Each call draws ``CANDIDATES_PER_DIRECTION * K`` random directions, keeps the K farthest apart and
    runs ``ascent_steps`` of :func:`ascend_directions`. With K = 1 this is the max-sliced distance.
    """

    name = "max_sliced_wasserstein"

    def __init__(
        self, num_projections: int, block_size: int | None, p: int, seed: int, ascent_steps: int, step_size: float
    ) -> None:
        super().__init__(num_projections, block_size, p, seed)
        self.ascent_steps, self.step_size = ascent_steps, step_size

    def directions(self, x: Tensor, y: Tensor) -> Tensor:
        candidates = random_directions(
            x.shape[1], CANDIDATES_PER_DIRECTION * self.num_projections, self.generator(x.device)
        )
        with torch.no_grad():
            best = per_direction_distances(x, y, candidates, self.p).topk(self.num_projections).indices
        return ascend_directions(x, y, candidates[:, best], self.p, self.ascent_steps, self.step_size)


class LearnedProjectionLoss(SlicedWassersteinLoss):
    """SW along K directions that persist across calls and climb the distance by one step per call.

    Within a block the directions start random (from the seed) and follow the quantized output as it
    trains, so over a block's steps they approach the max-sliced directions at the cost of one extra
    projection per step; ``reseed`` (the engine calls it per block) starts them afresh.
    """

    name = "learned_sliced_wasserstein"

    def __init__(self, num_projections: int, block_size: int | None, p: int, seed: int, step_size: float) -> None:
        super().__init__(num_projections, block_size, p, seed)
        self.step_size = step_size
        self._directions: dict[torch.device, Tensor] = {}

    def reseed(self, seed: int, keep_learned: bool = False) -> None:
        super().reseed(seed)
        if not keep_learned:
            self._directions.clear()

    def directions(self, x: Tensor, y: Tensor) -> Tensor:
        current = self._directions.get(x.device)
        if current is None or current.shape[0] != x.shape[1]:
            current = super().directions(x, y)
        self._directions[x.device] = ascend_directions(x, y, current, self.p, 1, self.step_size)
        return current


class MultiScaleLoss(Loss):
    """The sum of SW at several scales: 1 is the token level, b > 1 blocks of b consecutive tokens.

    Each scale draws its own directions from ``seed + position``, so the sum equals the scales' SW
    losses computed one by one.
    """

    name = "multi_scale_sliced_wasserstein"
    needs_hidden_states = True

    def __init__(self, num_projections: int, scales: tuple[int, ...], p: int, seed: int) -> None:
        self.scales = scales
        self.block_sizes = tuple(scale for scale in scales if scale > 1)
        self.parts = [
            SlicedWassersteinLoss(num_projections, None if scale == 1 else scale, p, seed + i)
            for i, scale in enumerate(scales)
        ]

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        if output.ndim == 3 and any(output.shape[1] % size for size in self.block_sizes):
            raise ConfigError(SCALE_ERROR, "sw_scales")
        total = self.parts[0](output, target)
        for part in self.parts[1:]:
            total = total + part(output, target)
        return total

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        return sum(
            (part.model_objective(student, teacher) for part in self.parts[1:]),
            self.parts[0].model_objective(student, teacher),
        )

    def reseed(self, seed: int, keep_learned: bool = False) -> None:
        for i, part in enumerate(self.parts):
            part.reseed(seed + i, keep_learned)
