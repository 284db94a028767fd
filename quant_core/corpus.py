"""Calibration and evaluation text: bundled corpora, tokenization and token windows.

Calibration draws ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (as GPTQ and
OmniQuant sample C4/WikiText), so a seed fixes the data exactly; a model that expects BOS gets it at
the start of each, as in evaluation (quant_core/eval_windows.py holds the evaluation protocol).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from quant_core.errors import ConfigError

CORPORA_DIR = Path(__file__).with_name("corpora")
BUNDLED_TEXTS = {
    "austen": CORPORA_DIR / "austen_northanger.txt",
    "persuasion": CORPORA_DIR / "austen_persuasion.txt",
}


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


def calibration_windows(ids: Tensor, n_samples: int, seq_len: int, seed: int, start: int | None = None) -> Tensor:
    """``[n_samples, seq_len]`` windows starting at seeded random offsets of the token stream; with
    ``start``, each is that token followed by ``seq_len - 1`` tokens of the text."""
    if ids.numel() < seq_len + 1:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}", "calibration.seq_len"
        )
    taken = seq_len if start is None else seq_len - 1
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - taken + 1, (n_samples,), generator=generator)
    windows = torch.stack([ids[s : s + taken] for s in starts.tolist()])
    if start is None:
        return windows
    return torch.cat([torch.full((n_samples, 1), start, dtype=ids.dtype), windows], dim=1)
