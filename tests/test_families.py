"""Every common family, on a tiny model built in code: every method runs, and the rotation, the end-to-end
tuning and the packed export run or are refused before any work with the reason.

Families (tests/tiny_models.py): Llama 2 and 3 (rope scaling, untied head), Mistral (sliding window),
Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 2 (soft-capped logits and attention, sandwich norms) and
Gemma 3 (1 + w norms, scaled embeddings, sliding layers, q/k norms), Phi-3 (fused qkv and gate_up), OPT,
GPT-2, and the mixtures of experts Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE. The Llama, Mistral,
Mixtral and Gemma ones tokenize with BOS in front, as theirs do. The mixtures of experts are packed with
symmetric grids, the only ones their loaders take (tests/test_experts.py checks the refusal).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from quant_core.corpus import BUNDLED_TEXTS
from quant_core.errors import ConfigError
from quant_core.eval_windows import evaluation_windows
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.model_io import load_tokenizer
from quant_core.perplexity import perplexity
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec
from tests.tiny_models import build_model, build_tokenizer

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt2", *MOE]
ADDS_BOS = {"llama", "llama3", "mistral", "gemma2", "gemma3", "mixtral"}
# Why each refuses the absorbed rotation (quant_core/absorbed_rotation.py): Gemma's norms multiply by
# 1 + w, Phi-3's fused projections and OPT's and GPT-2's LayerNorms (with a mean and a bias) do not fold;
# a mixture of experts' routers would have to turn with the residual stream.
REFUSES_ROTATION = {"gemma2", "gemma3", "phi3", "opt", "gpt2", *MOE}
# AWQ folds each scale into the layer before it; a sparse block's input feeds the router and every expert.
REFUSES_METHOD = {("awq", family) for family in MOE}
REFUSES_PACKING = {"gpt2"}  # its Conv1D layers: compressed-tensors packs nn.Linear weights only
FAST = {
    "rtn": {},
    "gptq": {},
    "awq": {"search_samples": 2},
    "omniquant": {"epochs": 1},
    "tesseraq": {"rounds": 2, "steps_per_round": 2, "batch_size": 2},
    "normtweaking": {"epochs": 1},
    "discquant": {"grad_accum": 1},
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family saved as a user would point at it, with its tokenizer."""
    tokenizers = {adds: build_tokenizer(adds_bos=adds) for adds in (False, True)}
    dirs = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_model(family).save_pretrained(path, safe_serialization=True)
        tokenizers[family in ADDS_BOS].save_pretrained(path)
        dirs[family] = path
    return dirs


def _spec(model: Path, method: str, symmetric: bool = False, **settings) -> JobSpec:
    return JobSpec(
        model=str(model),
        quant=QuantSpec(4, symmetric, 32),
        method=method,
        method_options=FAST[method],
        calibration=CalibrationSpec(n_samples=4, seq_len=32),
        evaluation=EvaluationSpec(max_windows=2),
        **settings,
    )


@pytest.mark.parametrize("method", sorted(FAST))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_quantizes_every_family(family: str, method: str, family_dirs: dict[str, Path], tmp_path) -> None:
    spec = _spec(family_dirs[family], method, export_formats=("fake_quant",))
    if (method, family) in REFUSES_METHOD:
        with pytest.raises(ConfigError, match="AWQ has no scale layout") as info:
            run_job(spec, tmp_path)
        assert info.value.field == "method" and not (tmp_path / "report.json").exists()
        return
    report = run_job(spec, tmp_path)
    ppl = report.perplexity["persuasion"]
    assert 1 < ppl.before < 1e4 and 1 < ppl.after < 1e4, ppl
    assert report.eval_protocol["start"] == (
        "every window" if family in ADDS_BOS else "first window (lm-eval's rolling windows)"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_tuning_and_packed_export_run_or_are_refused_up_front(
    family: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """GPTQ with the absorbed rotation, end-to-end tuning and the packed export; what a family does not fit
    is refused naming the setting before any model work, and the job then runs without it. The packed
    checkpoint reloads in transformers to the report's perplexity."""
    model = family_dirs[family]
    settings = {"rotation": "hadamard", "export_formats": ("pack_quantized",), "symmetric": family in MOE}
    for name, field, refused in (
        ("rotation", "rotation", REFUSES_ROTATION),
        ("export_formats", "model", REFUSES_PACKING),
    ):
        if family in refused:
            with pytest.raises(ConfigError) as info:
                run_job(_spec(model, "gptq", **settings), tmp_path / "refused")
            assert info.value.field == field
            assert not (tmp_path / "refused" / "report.json").exists()
            settings.pop(name)
    tuning = {"epochs": 1, "loss": "kd_sw", "precision": "float32"}
    report = run_job(_spec(model, "gptq", finetune=tuning, **settings), tmp_path / "job")
    assert report.method_stats["finetune"]["steps"] == 4
    # Phi-3's are fused, OPT's and GPT-2's fewer; 8 experts of 3 (and Qwen2-MoE's shared expert, not its
    # gate), and Qwen3-MoE's first block dense
    linears = {"phi3": 8, "opt": 12, "gpt2": 8, "mixtral": 56, "qwen2_moe": 62, "qwen3_moe": 35}.get(family, 14)
    assert report.method_stats["finetune"]["grid_linears"] == linears
    if family in REFUSES_PACKING:
        return
    packed = tmp_path / "job" / report.exports["pack_quantized"].path
    reloaded = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
    text = evaluation_windows(load_tokenizer(str(packed)), BUNDLED_TEXTS["persuasion"], 32, 2)
    ours = perplexity(reloaded, text.ids, scored=text.scored)
    assert ours == pytest.approx(report.perplexity["persuasion"].after, rel=1e-4)
