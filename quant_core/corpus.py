"""Calibration and evaluation text: bundled corpora, tokenization and token windows.

Calibration draws ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (as GPTQ and
OmniQuant sample C4/WikiText), so a seed fixes the data exactly. Evaluation uses consecutive
non-overlapping windows, the usual perplexity protocol.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from quant_core.errors import ConfigError

CORPORA_DIR = Path(__file__).with_name("corpora")
MAX_SAMPLES = 4096  # calibration windows a job may ask for (its blocks' or its tuning's)
BUNDLED_TEXTS = {
    "austen": CORPORA_DIR / "austen_northanger.txt",
    "persuasion": CORPORA_DIR / "austen_persuasion.txt",
}


def calibrated_on_evaluation(name: str) -> ConfigError:
    """The refusal of a job whose calibration text is one of its evaluation texts."""
    return ConfigError(
        f"calib.text is also the evaluation text {name!r}: the report would score the model on the text it was "
        "fitted to; calibrate or evaluate on another text",
        "calib.text",
    )


def resolve_text(source: str, field: str) -> Path:
    """A bundled corpus name (``austen``, ``persuasion``) or a path to a UTF-8 text file."""
    path = BUNDLED_TEXTS.get(source, Path(source).expanduser())
    if not path.is_file():
        names = ", ".join(BUNDLED_TEXTS)
        raise ConfigError(f"{field}: '{source}' is neither a bundled corpus ({names}) nor a readable file", field)
    return path


def tokenize_file(tokenizer: PreTrainedTokenizerBase, path: Path) -> Tensor:
    """All token ids of a text file as one 1-D tensor (no special tokens: windows are cut anywhere)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: Tensor, n_samples: int, seq_len: int, seed: int) -> Tensor:
    """``[n_samples, seq_len]`` windows starting at seeded random offsets of the token stream."""
    if ids.numel() < seq_len + 1:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}", "calib.seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(ids: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Consecutive non-overlapping ``seq_len`` windows; the incomplete tail is dropped."""
    count = ids.numel() // seq_len
    if count == 0:
        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than seq_len = {seq_len}", "eval_seq_len")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].reshape(count, seq_len)
