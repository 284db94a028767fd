"""One job over several processes: which calibration windows each rank holds, and what they exchange.

A job with ``world_size`` ranks runs the same pipeline in every rank (torchrun's model: one process
per device, or per share of a CPU's cores). Each rank holds a contiguous share of the windows, so the
activations of both chains per rank fall with the world size; whatever a method sums over windows
(GPTQ's Hessians) is summed over ranks with torch.distributed (NCCL on GPUs, Gloo on CPUs), and the
per-linear work that does not split over windows (GPTQ's column walk) is split over ranks by rows
and gathered. Rank 0 (the leader) reports progress, writes the checkpoint and the report.

:class:`Ranks` with one rank makes no call into torch.distributed at all: a one-rank job is the
one-process job, bit for bit. Every collective runs under the process group's timeout, so a rank that
died ends the others' wait with an error instead of a hang.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GRADIENT_BUCKET = 2**24  # elements summed per collective: 64 MiB of float32


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: its rank among ``world_size`` processes of one process group."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """The rank that reports, writes and decides (cancellation)."""
        return self.rank == 0

    def bounds(self, count: int) -> list[tuple[int, int]]:
        """Every rank's contiguous ``[start, end)`` share of ``count`` items; the first ranks take one more
        when they do not divide evenly (as ``torch.tensor_split``)."""
        base, extra = divmod(count, self.world_size)
        starts = [r * base + min(r, extra) for r in range(self.world_size + 1)]
        return list(itertools.pairwise(starts))

    def share(self, rows: Tensor) -> Tensor:
        """This rank's rows of ``rows`` (windows, or a matrix's rows)."""
        start, end = self.bounds(rows.shape[0])[self.rank]
        return rows[start:end]

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (a new tensor on every rank; the same tensor with one rank)."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def total(self, value: float) -> float:
        """A number summed over ranks, in float64."""
        if not self.distributed:
            return value
        return float(self.sum(torch.tensor(value, dtype=torch.float64, device=self._device)))

    def gather(self, local: Tensor, counts: list[int]) -> Tensor:
        """Every rank's ``local`` rows, concatenated in rank order, on every rank; ``counts[r]`` is how many
        rows rank ``r`` holds (collectives need equal shapes, so shorter shares travel padded)."""
        if not self.distributed:
            return local
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])

    def gather_rows(self, local: Tensor, rows: int) -> Tensor:
        """The whole ``rows``-row matrix from every rank's :meth:`share` of it."""
        return self.gather(local, [end - start for start, end in self.bounds(rows)])

    def gather_differentiable(self, local: Tensor, counts: list[int]) -> Tensor:
        """:meth:`gather` through which gradients flow back to each rank's own rows.

        Every rank computes the same loss on the gathered tensor; the backward pass sums the ranks'
        gradients of the whole tensor and keeps this rank's rows, so that a loss divided by the world
        size on every rank gives, summed over ranks, the one-process gradient.
        """
        if not self.distributed:
            return local
        gathered: Tensor = _GatherRows.apply(local, counts, self)  # type: ignore[no-untyped-call]
        return gathered

    def sum_gradients(self, params: Sequence[Tensor]) -> None:
        """Sum every parameter's gradient over ranks, a collective per bucket of about
        :data:`GRADIENT_BUCKET` elements (a parameter with no gradient on this rank, one that held no
        window of the step, counts as zeros). Buckets bound the flat copy a whole model's gradients
        would otherwise need at once (DiscQuant's), as DDP's do."""
        if not self.distributed or not params:
            return
        bucket: list[Tensor] = []
        filled = 0
        for index, param in enumerate(params):
            bucket.append(param)
            filled += param.numel()
            if filled >= GRADIENT_BUCKET or index == len(params) - 1:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
                for owner, part in zip(bucket, flat.split([g.numel() for g in grads]), strict=True):
                    owner.grad = part.view_as(owner).clone()
                bucket, filled = [], 0

    def objects(self, value: object) -> list[object]:
        """Every rank's ``value`` (picklable), in rank order; also a point every rank must reach."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def decide(self, flag: bool) -> bool:
        """The leader's ``flag`` on every rank, so that every rank takes the same branch (a cancel)."""
        if not self.distributed:
            return flag
        decided = torch.tensor([1.0 if flag else 0.0], device=self._device)
        dist.broadcast(decided, 0)
        return bool(decided.item())

    def leaders_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The leader's ``dtype`` on every rank."""
        if not self.distributed:
            return dtype
        code = torch.tensor([DTYPES.index(dtype) if dtype in DTYPES else -1], device=self._device)
        dist.broadcast(code, 0)
        return DTYPES[int(code.item())] if int(code.item()) >= 0 else dtype

    def peaks(self, value: float) -> list[float]:
        """``value`` (a peak memory) of every rank, in rank order."""
        if not self.distributed:
            return [value]
        mine = torch.tensor([value], dtype=torch.float64, device=self._device)
        return [float(v) for v in self.gather(mine.expand(1), [1] * self.world_size)]

    def layout(self, windows: int) -> dict[str, object]:
        """What the report says of the split: ranks, backend, and each rank's calibration windows."""
        return {
            "world_size": self.world_size,
            "backend": dist.get_backend() if self.distributed else None,
            "calibration_windows_by_rank": [end - start for start, end in self.bounds(windows)],
            "split": "calibration and evaluation windows in contiguous shares; sums over windows (Hessians, "
            "Gram matrices, activation means, NLL) and gradients all-reduced; GPTQ's column walk by weight rows, "
            "gathered; outputs a loss compares gathered; DiscQuant (the whole model on every rank) shares out "
            "each step's forwards",
        }

    @property
    def _device(self) -> torch.device:
        """Where this rank's collectives exchange small tensors: NCCL only moves CUDA tensors."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SOLO = Ranks()


class HeldBatch:
    """One step's windows ``idx`` (numbered over all ranks) when each rank holds a contiguous share of
    ``windows`` of them (its activations, or its teacher's hidden states).

    Each rank runs the windows of the batch it holds (``mine``, numbered within its share), and
    :meth:`whole` gathers every rank's rows back into the batch's order, so that every rank computes
    the loss one process computes on the whole batch: an SW term sees all the batch's tokens at once,
    as in one process. ``row`` is an empty tensor of the rows' shape and type. With one rank,
    ``mine`` is ``idx``.
    """

    def __init__(self, ranks: Ranks, windows: int, idx: Tensor, row: Tensor) -> None:
        self.ranks, self._row = ranks, row
        self.mine, self.counts, self._order = idx, [idx.numel()], torch.arange(idx.numel())
        if ranks.distributed:
            bounds = ranks.bounds(windows)
            held = [(idx >= start) & (idx < end) for start, end in bounds]
            self.mine = idx[held[ranks.rank]] - bounds[ranks.rank][0]
            self.counts = [int(h.sum()) for h in held]
            # gathered rows come rank by rank: where each one sits in the batch
            self._order = torch.argsort(torch.cat([h.nonzero().flatten() for h in held]))

    def gather(self, rows: Tensor) -> Tensor:
        """The batch's rows, in its order, on every rank, from the ``rows`` this rank computed for ``mine``."""
        return self.ranks.gather(rows, self.counts)[self._order] if self.ranks.distributed else rows

    def whole(self, local: Tensor | None, anchor: Tensor | None = None) -> Tensor:
        """The batch's rows, in its order, on every rank. ``local``: without ``anchor``, this rank's
        whole share (the rows of ``mine`` are taken from it); with ``anchor`` (a trained parameter),
        the rows this rank computed for ``mine`` (None: it holds none of the batch), and gradients
        flow back through the gather to them. A rank with no row gathers an empty slice of
        ``anchor``, so that autograd passes through the gather's collective on that rank too, even
        when it differentiates toward the parameters only.
        """
        if anchor is None:
            assert local is not None
            return self.gather(local[self.mine])
        if local is None:
            local = anchor.reshape(-1)[:0].to(self._row.dtype).reshape(self._row.shape)
        if not self.ranks.distributed:
            return local
        return self.ranks.gather_differentiable(local, self.counts)[self._order]


class _GatherRows(torch.autograd.Function):
    """Rows from every rank forward; backward, the summed gradient of this rank's rows."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, counts: list[int], ranks: Ranks) -> Tensor:
        ctx.ranks, ctx.counts = ranks, counts
        return ranks.gather(local.detach(), counts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ranks: Ranks = ctx.ranks
        start = sum(ctx.counts[: ranks.rank])
        total = ranks.sum(grad.contiguous())
        return total[start : start + ctx.counts[ranks.rank]], None, None
