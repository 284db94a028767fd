"""The evaluation protocol: which tokens each window scores with which context, checked against a
naive one-window-at-a-time loop and against lm-evaluation-harness's own rolling log-likelihood."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from quant_core.corpus import BUNDLED_TEXTS, calibration_windows
from quant_core.errors import ConfigError
from quant_core.eval_windows import WindowStart, cut_windows, evaluation_windows, per_unit, window_start
from quant_core.perplexity import perplexity
from tests.tiny_models import build_model, build_tokenizer

BOS = 1000


def _scored_with_context(windows: torch.Tensor, first_scored: torch.Tensor) -> list[tuple[int, list[int]]]:
    """Every scored token with the inputs before it in its window."""
    return [
        (int(window[j + 1]), window[: j + 1].tolist())
        for window, first in zip(windows, first_scored, strict=True)
        for j in range(int(first), window.numel() - 1)
    ]


@pytest.mark.parametrize("total", [40, 41, 45, 47])
def test_bos_on_every_window_scores_each_token_once_after_bos_and_its_predecessors(total: int) -> None:
    ids = torch.arange(total)
    windows, first_scored, first, end = cut_windows(ids, 8, WindowStart(BOS, True))
    assert (first, end) == (0, total)
    assert (windows[:, 0] == BOS).all()
    scored = _scored_with_context(windows, first_scored)
    assert [token for token, _ in scored] == list(range(total))  # each token once, in order
    for token, context in scored:  # after BOS, a run of the tokens right before it
        assert context[0] == BOS and context[1:] == list(range(token - len(context) + 1, token))


@pytest.mark.parametrize("start", [WindowStart(BOS, False), WindowStart(None, False)])
def test_first_window_only_scores_each_token_once_with_the_preceding_tokens(start: WindowStart) -> None:
    ids = torch.arange(45)
    windows, first_scored, first, end = cut_windows(ids, 8, start)
    assert (first, end) == (0 if start.token is not None else 1, 45)
    assert windows[0, 0].item() == (BOS if start.token is not None else 0)
    assert (windows[1:, 0] != BOS).all()
    scored = _scored_with_context(windows, first_scored)
    assert [token for token, _ in scored] == list(range(first, 45))
    for token, context in scored[8:]:  # past the first window: full windows of predecessors
        assert context == list(range(token - len(context), token))
    assert windows.shape[1] == 8 and first_scored[-1].item() == 7 - (45 - first) % 7


def test_max_windows_scores_a_prefix_and_a_short_text_is_refused() -> None:
    windows, first_scored, first, end = cut_windows(torch.arange(100), 10, WindowStart(BOS, True), max_windows=3)
    assert windows.shape == (3, 10) and (first, end) == (0, 27) and first_scored.tolist() == [0, 0, 0]
    with pytest.raises(ConfigError, match="fewer than the 9 a window needs") as info:
        cut_windows(torch.arange(8), 10, WindowStart(BOS, True))
    assert info.value.field == "evaluation.seq_len"


def test_window_start_follows_whether_the_tokenizer_adds_bos() -> None:
    assert window_start(build_tokenizer(adds_bos=True)) == WindowStart(1, True)
    assert window_start(build_tokenizer()) == WindowStart(1, False)  # lm-eval's prefix: BOS where defined


def test_calibration_windows_start_with_the_token_given() -> None:
    ids = torch.arange(1000)
    windows = calibration_windows(ids, 5, 20, seed=3, start=BOS)
    assert windows.shape == (5, 20) and (windows[:, 0] == BOS).all()
    assert all(torch.equal(w[1:], torch.arange(w[1], w[1] + 19)) for w in windows)


@pytest.mark.parametrize(
    ("arch", "adds_bos"),
    [("llama", False), ("llama", True), ("gemma2", True), ("gemma3", True), ("gpt2", False), ("opt", False)],
)
def test_perplexity_over_scored_positions_matches_a_naive_loop(arch: str, adds_bos: bool) -> None:
    """Independent reference: log-softmax of the model's own logits for each scored token given its window's
    prefix, one token at a time (the scoring computes logits from the last hidden states in chunks; Gemma 2
    soft-caps them)."""
    tokenizer, model = build_tokenizer(adds_bos), build_model(arch).eval()
    text = evaluation_windows(tokenizer, BUNDLED_TEXTS["persuasion"], 24, max_windows=5)
    nll = 0.0
    with torch.no_grad():
        for token, context in _scored_with_context(text.ids, text.first_scored):
            logits = model(torch.tensor([context])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[token].item()
    reference = math.exp(nll / text.tokens)
    assert perplexity(model, text.ids, batch_size=2, scored=text.scored) == pytest.approx(reference, rel=1e-5)


def _lm_eval_rolling(model: torch.nn.Module, tokenizer, document: str, max_length: int) -> float:
    """lm-eval's summed log-likelihood of ``document``. Told not to add special tokens: left to the tokenizer,
    a BOS-adding one would encode BOS into the text, after the BOS lm-eval puts in front, and score it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=max_length, device="cpu", add_bos_token=False
    )
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(document,), idx=0)
    (loglikelihood,) = wrapped.loglikelihood_rolling([request], disable_tqdm=True)
    return loglikelihood


def test_scores_agree_with_lm_evaluation_harness_wikitext_metrics(tmp_path: Path) -> None:
    """The same summed log-likelihood as lm-eval's rolling windows, and its wikitext word/byte perplexity.

    A model that does not expect BOS (lm-eval prefixes only a document's first window); our windows of
    L tokens are lm-eval's max_length L - 1. The text ends mid-window, so the last window's context counts.
    """
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    tokenizer, model = build_tokenizer(), build_model("llama").eval()
    document = BUNDLED_TEXTS["persuasion"].read_text(encoding="utf-8")[:3000]
    path = tmp_path / "doc.txt"
    path.write_text(document, encoding="utf-8")
    text = evaluation_windows(tokenizer, path, 48)
    assert text.first_scored[-1] > 0  # a partial last window
    ours = perplexity(model, text.ids, batch_size=3, scored=text.scored)

    loglikelihood = _lm_eval_rolling(model, tokenizer, document, max_length=47)
    assert -math.log(ours) * text.tokens == pytest.approx(loglikelihood, rel=1e-5)
    theirs = process_results({"page": document}, [loglikelihood])
    units = per_unit(ours, text.counts())
    assert units["word_perplexity"] == pytest.approx(weighted_perplexity([theirs["word_perplexity"]]), rel=1e-4)
    assert units["byte_perplexity"] == pytest.approx(weighted_perplexity([theirs["byte_perplexity"]]), rel=1e-4)
    assert units["bits_per_byte"] == pytest.approx(bits_per_byte([theirs["bits_per_byte"]]), rel=1e-4)
    assert text.words == len(re.split(r"\s+", document)) and text.bytes == len(document.encode())


def test_a_bos_model_scores_as_lm_eval_within_one_window() -> None:
    """With BOS on every window, a text that fits one window is scored exactly as lm-eval scores it."""
    tokenizer, model = build_tokenizer(adds_bos=True), build_model("llama").eval()
    document = BUNDLED_TEXTS["persuasion"].read_text(encoding="utf-8")[:200]
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    windows = cut_windows(torch.tensor(ids), len(ids) + 1, window_start(tokenizer))[0]
    assert windows.shape[0] == 1 and windows[0, 0] == tokenizer.bos_token_id
    ours = perplexity(model, windows)
    theirs = _lm_eval_rolling(model, tokenizer, document, len(ids))  # its prefix: the tokenizer's BOS
    assert -math.log(ours) * len(ids) == pytest.approx(theirs, rel=1e-5)
