"""QuIP incoherence processing: randomized Hadamard rotations of a linear's weight and of its input.

Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees"
(NeurIPS 2023), Sec. 4: rounding error hurts least when the weight and the Hessian are *incoherent*
(no entry much larger than the average), and multiplying both sides of the weight by random
orthogonal matrices makes them so. Tseng et al., "QuIP#" (ICML 2024), Sec. 3, use the randomized
Hadamard transform for those matrices: a Hadamard matrix times a diagonal of random signs, normalized.

For a linear ``y = W x`` with ``W`` of shape ``[out, in]``:

- ``U = H_out S_out / sqrt(out)`` and ``V = H_in S_in / sqrt(in)`` are orthogonal (``S`` random signs);
- the method quantizes ``W' = U W V^T`` (GPTQ with the rotated Hessian ``V H V^T``, since the
  rotated layer reads ``V x``);
- the layer keeps ``U^T Q V``, the rotation undone, which computes exactly what ``Q`` computes on
  the rotated input. That weight lies on no per-channel grid, so only the fake-quant export can hold it.

Hadamard matrices exist only for orders 1, 2 and multiples of 4, and are built here as Kronecker
products of Sylvester matrices (orders ``2^k``) and Paley matrices (order ``q + 1`` for a prime
``q = 3 mod 4``, order ``2(q + 1)`` for a prime ``q = 1 mod 4``); SmolLM2's widths are
``576 = 36 * 16`` (Paley II, q = 17) and ``1536 = 12 * 128`` (Paley I, q = 11). A width for which
neither works is refused. The transform is applied factor by factor (``n * sum(factor sizes)``
operations per vector instead of ``n^2``), and never as a dense ``n x n`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

from quant_core.errors import ConfigError

MAX_SYLVESTER_FACTOR = 128  # powers of two are applied as Kronecker factors of at most this order


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _legendre(a: int, q: int) -> int:
    """The quadratic character of ``a`` modulo the odd prime ``q``: 0, 1 or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q): skew-symmetric for ``q = 3 mod 4``, symmetric for ``q = 1 mod 4``."""
    chi = torch.tensor([_legendre(d, q) for d in range(q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index.unsqueeze(0) - index.unsqueeze(1)) % q]


def sylvester(order: int) -> Tensor:
    """The ±1 Sylvester-Hadamard matrix of a power-of-two order (``[[H, H], [H, -H]]`` recursively)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, not {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    return h


def paley_i(q: int) -> Tensor:
    """Paley's first construction, order ``q + 1`` for a prime ``q = 3 mod 4``: ``I + [[0, 1^T], [-1, Q]]``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, not {q}")
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + core


def paley_ii(q: int) -> Tensor:
    """Paley's second construction, order ``2(q + 1)`` for a prime ``q = 1 mod 4``.

    The symmetric conference matrix ``C = [[0, 1^T], [1, Q]]`` has zeros exactly on its diagonal;
    each 0 becomes ``[[1, -1], [-1, -1]]`` and each ±1 becomes ``±[[1, 1], [1, -1]]``.
    """
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, not {q}")
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on_sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, on_sign) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zero)


def _paley(order: int) -> Tensor | None:
    """A Paley Hadamard matrix of this order, or None when neither construction gives it."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return paley_i(order - 1)
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return paley_ii(order // 2 - 1)
    return None


def _power_of_two_factors(order: int) -> list[Tensor]:
    factors = []
    while order > 1:
        size = min(order, MAX_SYLVESTER_FACTOR)
        factors.append(sylvester(size))
        order //= size
    return factors


@cache
def _factors(n: int) -> tuple[Tensor, ...] | None:
    """Hadamard matrices whose Kronecker product is a Hadamard matrix of order ``n``, or None.

    ``n = 2^a * r`` with ``r`` odd: the odd part goes into one Paley factor of order ``2^b * r``,
    or, failing that, into two Paley factors ``2^b1 * r1`` and ``2^b2 * r2`` with ``r1 * r2 = r``;
    the remaining power of two is Sylvester. The smallest such factors are taken.
    """
    if n < 1:
        return None
    twos, odd = 0, n
    while odd % 2 == 0:
        twos, odd = twos + 1, odd // 2
    if odd == 1:
        return tuple(_power_of_two_factors(n))
    for b in range(2, twos + 1):
        factor = _paley(2**b * odd)
        if factor is not None:
            return (factor, *_power_of_two_factors(2 ** (twos - b)))
    for r1 in range(3, int(odd**0.5) + 1, 2):
        if odd % r1:
            continue
        r2 = odd // r1
        for b1 in range(2, twos - 1):
            for b2 in range(2, twos - b1 + 1):
                first, second = _paley(2**b1 * r1), _paley(2**b2 * r2)
                if first is not None and second is not None:
                    return (first, second, *_power_of_two_factors(2 ** (twos - b1 - b2)))
    return None


def has_hadamard(n: int) -> bool:
    """Whether this module can build a Hadamard matrix of order ``n``."""
    return _factors(n) is not None


def hadamard_factors(n: int, field: str = "incoherence") -> tuple[Tensor, ...]:
    """The ±1 Kronecker factors of a Hadamard matrix of order ``n`` (float64); ConfigError naming ``field``."""
    factors = _factors(n)
    if factors is None:
        raise ConfigError(
            f"incoherence: hadamard needs a Hadamard matrix of order {n}, and none is available here "
            "(orders 2^a * m with m - 1 a prime = 3 mod 4 or m/2 - 1 a prime = 1 mod 4, or a product of two such); "
            "use incoherence: none for this model",
            field,
        )
    return factors


def hadamard_matrix(n: int) -> Tensor:
    """The dense ±1 Hadamard matrix of order ``n`` (``H H^T = n I``), the Kronecker product of its factors."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for factor in hadamard_factors(n):
        matrix = torch.kron(matrix, factor)
    return matrix


def _kron_apply(x: Tensor, factors: Sequence[Tensor], transpose: bool, dim: int) -> Tensor:
    """``K v`` (or ``K^T v`` with ``transpose``) for every vector ``v`` of ``x`` along ``dim``, ``K``
    the Kronecker product of ``factors``.

    With ``dim`` viewed row-major as ``[f1, ..., fk]``, ``K`` acts as ``f_i`` on axis i. Each factor
    is one matrix product on a contiguous view (batched over the axes before it). Moving the axis
    last and back would copy the whole tensor twice per factor and multiply in products of inner
    size 12 to 36: on SmolLM2 that took most of an end-to-end tuning step, which rebuilds and
    rotates every weight (and its gradient) each step.
    """
    dim %= x.dim()
    sizes = [factor.shape[0] for factor in factors]
    before, after = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    y = x
    for axis, factor in enumerate(factors):
        matrix = factor.to(device=x.device, dtype=x.dtype)
        matrix = matrix.T if transpose else matrix
        outer, inner = before * math.prod(sizes[:axis]), math.prod(sizes[axis + 1 :]) * after
        if inner == 1:
            y = y.reshape(outer, sizes[axis]) @ matrix.T
        else:
            y = torch.matmul(matrix, y.reshape(outer, sizes[axis], inner))
    return y.reshape(x.shape)


class RandomizedHadamard:
    """The orthogonal ``R = H diag(s) / sqrt(n)`` with seeded random signs ``s`` (QuIP#, Sec. 3)."""

    def __init__(self, n: int, generator: torch.Generator, field: str = "incoherence") -> None:
        self.n = n
        self.factors = hadamard_factors(n, field)
        self.signs = torch.randint(0, 2, (n,), generator=generator, device=generator.device).double() * 2 - 1

    @classmethod
    def with_signs(cls, signs: Tensor, field: str = "incoherence") -> RandomizedHadamard:
        """The rotation with these signs (as kept on a layer), without drawing."""
        rotation = cls.__new__(cls)
        rotation.n, rotation.factors = signs.numel(), hadamard_factors(signs.numel(), field)
        rotation.signs = signs.detach().double()
        return rotation

    def _signs_along(self, x: Tensor, dim: int) -> Tensor:
        return self.signs.to(x).reshape(-1, *[1] * (x.dim() - 1 - dim % x.dim()))

    def apply(self, x: Tensor, dim: int = -1) -> Tensor:
        """Each vector ``v`` of ``x`` along ``dim`` (of size ``n``) to ``R v``: ``x @ R^T`` for the last
        dimension, ``R @ x`` for the first of a matrix."""
        return _kron_apply(x * self._signs_along(x, dim), self.factors, False, dim) / self.n**0.5

    def apply_transpose(self, x: Tensor, dim: int = -1) -> Tensor:
        """Each vector ``v`` of ``x`` along ``dim`` to ``R^T v``: ``x @ R`` for the last dimension."""
        return _kron_apply(x, self.factors, True, dim) * self._signs_along(x, dim) / self.n**0.5

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``R`` as a dense matrix (for checks; the transform itself never builds it)."""
        return self.apply(torch.eye(self.n, dtype=dtype)).T


class LinearRotation:
    """``U`` and ``V`` of one linear: ``rotate`` gives ``U W V^T``, ``restore`` gives ``U^T W' V``."""

    def __init__(self, out_rotation: RandomizedHadamard, in_rotation: RandomizedHadamard) -> None:
        self.out_rotation, self.in_rotation = out_rotation, in_rotation

    @classmethod
    def draw(cls, out_features: int, in_features: int, generator: torch.Generator) -> LinearRotation:
        """Signs for ``U`` then for ``V`` from ``generator`` (so a seed fixes both)."""
        return cls(RandomizedHadamard(out_features, generator), RandomizedHadamard(in_features, generator))

    def rotate(self, weight: Tensor) -> Tensor:
        """``U W V^T`` for ``W`` of shape ``[out, in]``."""
        return self.out_rotation.apply(self.in_rotation.apply(weight), dim=0)

    def restore(self, rotated: Tensor) -> Tensor:
        """``U^T W' V``: the inverse of :meth:`rotate`."""
        return self.out_rotation.apply_transpose(self.in_rotation.apply_transpose(rotated), dim=0)

    def rotate_hessian(self, hessian: Tensor) -> Tensor:
        """``V H V^T``: the Hessian of the rotated layer's input ``V x``."""
        return rotate_hessian(hessian, self.in_rotation)


class _Restore(torch.autograd.Function):
    """``U^T M V`` whose gradient is ``U G V^T`` (the rotations are orthogonal): nothing is kept for backward."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, rotation: LinearRotation) -> Tensor:
        ctx.rotation = rotation
        return rotation.restore(matrix)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.rotation.rotate(grad), None


def restore_rotation(matrix: Tensor, rotation: LinearRotation) -> Tensor:
    """:meth:`LinearRotation.restore` for a trained matrix: autograd would keep each Hadamard
    factor's input for backward (several copies of every weight); the transpose rotation needs none."""
    restored: Tensor = _Restore.apply(matrix, rotation)  # type: ignore[no-untyped-call]
    return restored


def rotate_hessian(hessian: Tensor, in_rotation: RandomizedHadamard) -> Tensor:
    """``V H V^T`` for a symmetric ``[in, in]`` Hessian."""
    return in_rotation.apply(in_rotation.apply(hessian), dim=0)


def check_widths(widths: Iterable[int], field: str = "method_options.incoherence") -> None:
    """Refuse up front, naming ``field``, when any width has no Hadamard matrix here."""
    for width in sorted(set(widths)):
        hadamard_factors(width, field)
