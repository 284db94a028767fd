"""What every loss is: a named objective on a block's output, and the few helpers all of them share.

Kept apart from the registry (``quant_core.losses``) so that the Sliced-Wasserstein family
(``quant_core.sliced``) can build on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> Tensor:
    """Half-precision outputs are compared in fp32 (sorting and squaring lose too much in 16 bits)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def tokens(t: Tensor) -> Tensor:
    """Flatten ``[..., hidden]`` to ``[tokens, hidden]``."""
    return t.reshape(-1, t.shape[-1])


@dataclass
class ModelOutputs:
    """What a whole-model objective compares: next-token logits ``[batch, seq, vocab]`` and, when the
    loss needs them, the final hidden states ``[batch, seq, hidden]``."""

    logits: Tensor
    hidden: Tensor | None = None


class Loss:
    """A named objective ``loss(output, target) -> scalar``; ``reseed`` restarts its random draws.

    A loss that also compares what modules *inside* the block return (the attention and MLP outputs)
    names them in ``sites``; the training loop then records those modules' outputs and adds
    ``site_terms`` to the loss, and the engine provides their full-precision targets.
    """

    name: str = ""
    needs_hidden_states: bool = False  # whether model_objective reads ModelOutputs.hidden
    sites: tuple[str, ...] = ()
    block_sizes: tuple[int, ...] = ()  # token-block sizes its samples take: each must divide seq_len

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def terms(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The loss as its weighted terms, which sum to ``self(output, target)``: one term by default."""
        return {self.name: self(output, target)}

    def site_terms(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Weighted terms on the outputs of ``sites``; none for a loss on the block output alone."""
        return {}

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """The loss between two whole models' outputs: by default, on their next-token logits."""
        return self(student.logits, teacher.logits)

    def model_terms(self, student: ModelOutputs, teacher: ModelOutputs) -> dict[str, Tensor]:
        """:meth:`model_objective` as its weighted terms, which sum to it: one term by default."""
        return {self.name: self.model_objective(student, teacher)}

    def reseed(self, seed: int) -> None:
        """Deterministic losses have nothing to reseed."""
