"""Evaluation windows under a stated protocol that lm-evaluation-harness and llama.cpp users can compare.

Why a protocol and not slices of one tokenization: a window cut anywhere in a long text starts
mid-sentence with no beginning-of-sequence token, and families trained to always see BOS at
position 0 (Gemma, Llama, Mistral) are then far off their distribution; their perplexity measures the
cut, not the model, and can even improve when the model is quantized. The rule here:

- Every window has ``seq_len`` input tokens and scores its ``seq_len - 1`` next-token predictions;
  the windows' scored tokens partition the text's tokens, each scored exactly once.
- A model that expects BOS (its tokenizer puts one in front of every text it encodes) gets BOS at
  position 0 of every window, followed by ``seq_len - 1`` tokens of the text, all scored.
- Any other model is scored as lm-evaluation-harness's rolling log-likelihood scores a document: the
  first window starts with the tokenizer's BOS (else its EOS) so that the text's first token is
  scored too, and each later window starts with the one token before its first scored token. With
  ``seq_len`` tokens here and ``max_length = seq_len - 1`` there, the scored positions and their
  contexts are the same, so the summed NLL is lm-eval's (tests/test_eval_windows.py runs lm-eval).
- The last, incomplete window takes earlier tokens as context and scores only its new tokens.

Word and byte perplexity (lm-eval's ``wikitext`` metrics) divide the same summed NLL by the words
(lm-eval's ``\\s+`` split) and UTF-8 bytes of the scored text, which unlike tokens are the same for
every tokenizer; bits per byte is the byte figure in base 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from quant_core.errors import ConfigError


@dataclass(frozen=True)
class WindowStart:
    """What position 0 of an evaluation window holds: ``token`` on every window, or only on the
    first one (then later windows start with context), or nothing (``token`` None)."""

    token: int | None
    every_window: bool

    @property
    def calibration_token(self) -> int | None:
        """The token calibration windows start with: the model's BOS where it expects one, so that it is
        calibrated on inputs like those it sees in use."""
        return self.token if self.every_window else None


def window_start(tokenizer: PreTrainedTokenizerBase) -> WindowStart:
    """BOS on every window where the tokenizer adds BOS itself; else lm-eval's prefix (BOS, else EOS)
    on the first window only."""
    bos = tokenizer.bos_token_id
    encoded = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    if bos is not None and encoded[:1] == [bos]:
        return WindowStart(bos, True)
    return WindowStart(bos if bos is not None else tokenizer.eos_token_id, False)


@dataclass(frozen=True)
class WindowedText:
    """One evaluation text cut into windows, and what its word and byte perplexity divide by."""

    ids: Tensor  # [count, seq_len] input tokens
    first_scored: Tensor  # [count]: of each window's seq_len - 1 next-token predictions, the first one scored
    words: int  # of the scored text, split as lm-eval splits it
    bytes: int  # UTF-8 bytes of the scored text

    @property
    def scored(self) -> Tensor:
        """``[count, seq_len - 1]``: which next-token predictions count."""
        positions = torch.arange(self.ids.shape[1] - 1)
        return positions[None, :] >= self.first_scored[:, None]

    @property
    def tokens(self) -> int:
        return int(self.scored.sum())

    def counts(self) -> dict[str, int]:
        return {"windows": int(self.ids.shape[0]), "tokens": self.tokens, "words": self.words, "bytes": self.bytes}


def cut_windows(
    ids: Tensor, seq_len: int, start: WindowStart, max_windows: int | None = None
) -> tuple[Tensor, Tensor, int, int]:
    """Windows of ``ids`` under the protocol: ``(windows, first_scored, first, end)`` where the scored
    tokens are exactly ``ids[first:end]`` (``end`` is short of the text only under ``max_windows``)."""
    total, predicted = ids.numel(), seq_len - 1
    needed = seq_len if start.token is None else predicted  # one window's worth of text
    if total < needed:
        raise ConfigError(
            f"evaluation text has {total} tokens, fewer than the {needed} a window needs", "evaluation.seq_len"
        )
    prefix = None if start.token is None else torch.tensor([start.token], dtype=ids.dtype)
    first = 0 if prefix is not None else 1
    windows: list[Tensor] = []
    first_scored: list[int] = []
    begin = first
    while begin < total and (max_windows is None or len(windows) < max_windows):
        end = min(begin + predicted, total)
        targets = end - predicted  # the window predicts ids[targets:end]
        if prefix is not None and (start.every_window or targets == 0):
            windows.append(torch.cat([prefix, ids[targets:end]]))
        else:
            windows.append(ids[targets - 1 : end])
        first_scored.append(begin - targets)
        begin = end
    return torch.stack(windows), torch.tensor(first_scored), first, begin


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase, path: Path, seq_len: int, max_windows: int | None = None
) -> WindowedText:
    """The text at ``path`` cut into windows under the protocol (see the module's docstring)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    windows, first_scored, first, end = cut_windows(ids, seq_len, window_start(tokenizer), max_windows)
    offsets = encoded["offset_mapping"]
    scored_text = text[offsets[first][0] if first else 0 : len(text) if end == ids.numel() else offsets[end - 1][1]]
    return WindowedText(windows, first_scored, len(re.split(r"\s+", scored_text)), len(scored_text.encode("utf-8")))


def protocol(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> dict[str, Any]:
    """The protocol as the report states it."""
    start = window_start(tokenizer)
    name = None if start.token is None else tokenizer.convert_ids_to_tokens(start.token)
    return {
        "window_tokens": seq_len,
        "scored_per_window": seq_len - 1,
        "stride": seq_len - 1,
        "start_token": name,
        "start": "every window" if start.every_window else "first window (lm-eval's rolling windows)",
        "lm_eval_max_length": None if start.every_window else seq_len - 1,
        "last_window": "earlier tokens as context, only new tokens scored",
    }


def per_unit(token_perplexity: float, counts: dict[str, int]) -> dict[str, float]:
    """Word and byte perplexity and bits per byte from the token perplexity over the same scored text."""
    nll = math.log(token_perplexity) * counts["tokens"]
    return {
        "word_perplexity": math.exp(nll / counts["words"]),
        "byte_perplexity": math.exp(nll / counts["bytes"]),
        "bits_per_byte": nll / counts["bytes"] / math.log(2),
    }
