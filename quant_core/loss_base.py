"""What every loss is: a named objective on a block's output, and the few helpers all of them share.

Kept apart from the registry (``quant_core.losses``) so that the Sliced-Wasserstein family
(``quant_core.sliced``) can build on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def compute_dtype(t: Tensor) -> Tensor:
    """Half-precision outputs are compared in fp32 (sorting and squaring lose too much in 16 bits)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def tokens(t: Tensor) -> Tensor:
    """Flatten ``[..., hidden]`` to ``[tokens, hidden]``."""
    return t.reshape(-1, t.shape[-1])


LOGIT_CHUNK = 256  # positions whose logits a whole-model objective holds at once (see ModelOutputs)


@dataclass
class ModelOutputs:
    """What a whole-model objective compares: next-token logits ``[batch, seq, vocab]`` and, when the
    loss needs them, the final hidden states ``[batch, seq, hidden]``.

    Without ``logits``, ``head`` makes them from ``hidden`` ``LOGIT_CHUNK`` positions at a time and the
    backward pass makes them again (:func:`per_token_over_logits`): the logits of a 262,144-token
    vocabulary (Gemma 3) over a 512-token window, their softmax and their gradient would otherwise be
    held at once, several GiB for a model of 270M parameters.
    """

    logits: Tensor | None
    hidden: Tensor | None = None
    head: Callable[[Tensor], Tensor] | None = None


PerTokenFn = Callable[[Tensor, Tensor, str], Tensor]


def per_token_over_logits(fn: PerTokenFn, student: ModelOutputs, teacher: ModelOutputs, reduction: str) -> Tensor:
    """``fn(student logits, teacher logits, reduction)`` for a ``fn`` whose terms are per token, with the
    logits made a chunk of positions at a time from each side's hidden states and ``head``; each chunk
    is recomputed in the backward pass (activation checkpointing), so one chunk's logits exist at once."""
    if student.hidden is None or teacher.hidden is None or student.head is None or teacher.head is None:
        raise ValueError("outputs without logits need their hidden states and output layer")
    student_head, teacher_head = student.head, teacher.head
    ours, theirs = tokens(student.hidden), tokens(teacher.hidden)

    def chunk_sum(hidden: Tensor, target_hidden: Tensor) -> Tensor:
        with torch.no_grad():
            target = compute_dtype(teacher_head(target_hidden))
        return fn(compute_dtype(student_head(hidden)), target, "sum")

    total = sum(
        (
            checkpoint(chunk_sum, ours[i : i + LOGIT_CHUNK], theirs[i : i + LOGIT_CHUNK], use_reentrant=False)
            for i in range(0, ours.shape[0], LOGIT_CHUNK)
        ),
        torch.zeros((), device=ours.device),
    )
    return total / ours.shape[0] if reduction == "mean" else total


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
        if student.logits is None or teacher.logits is None:
            raise ValueError(f"{self.name} compares whole logits; these outputs hold hidden states only")
        return self(student.logits, teacher.logits)

    def model_terms(self, student: ModelOutputs, teacher: ModelOutputs) -> dict[str, Tensor]:
        """:meth:`model_objective` as its weighted terms, which sum to it: one term by default."""
        return {self.name: self.model_objective(student, teacher)}

    def reseed(self, seed: int, keep_learned: bool = False) -> None:
        """Restart the random draws from ``seed`` and, unless ``keep_learned``, forget what the loss learned
        from call to call (learned SW directions). Deterministic losses have nothing to reseed."""
