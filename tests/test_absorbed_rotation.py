"""Rotations absorbed into the weights, against independent references: the unrotated model's own
logits (the rotation must not change the function), dense rotation matrices built from the Hadamard
matrix and the drawn signs, and the packed and GGUF checkpoints a rotated job writes.

Tolerances: the rotated fp32 model's logits match the original's to 1e-4 of their scale (every weight is
rotated in float64 and rounded once to float32, a relative error of 2^-24 per weight, accumulated over
two blocks); dense float64 products match to 1e-12.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from quant_core.absorbed_rotation import absorb_rotation, rotation_blockers
from quant_core.cli import main
from quant_core.errors import ConfigError
from quant_core.incoherence import RandomizedHadamard, hadamard_matrix
from quant_core.job_settings import JobSettings, validated
from quant_core.perplexity import perplexity
from tests.test_cli import SMALL
from tests.tiny_models import VOCAB, build_model

LOGIT_RTOL = 1e-4
_SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def _model(family: str, tied: bool, biases: bool) -> torch.nn.Module:
    """A seeded two-block model whose norm gains are random (ones would make the fold trivial)."""
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            num_hidden_layers=2,
            tie_word_embeddings=tied,
            attention_bias=biases,
            mlp_bias=biases,
            **_SIZES,
        )
        model = LlamaForCausalLM(config)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=tied, **_SIZES))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 2.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    ("family", "tied", "biases"), [("llama", True, False), ("llama", False, True), ("qwen2", True, True)]
)
def test_the_rotated_model_computes_the_same_function(family: str, tied: bool, biases: bool) -> None:
    model = _model(family, tied, biases)
    before = _logits(model)
    absorb_rotation(model, seed=3)
    after = _logits(model)
    torch.testing.assert_close(after, before, rtol=0, atol=LOGIT_RTOL * before.abs().max().item())
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    norms = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert all(bool((p == 1).all()) for p in norms)


def test_weights_are_the_dense_rotation_products() -> None:
    """With ``R = H diag(s) / sqrt(n)`` built densely from the Hadamard matrix and the signs drawn from the
    seed in the documented order (stream, then values): ``E R^T``, a writer ``R W``, ``v_proj`` as
    ``blockdiag(R2) W diag(g) R^T`` and ``o_proj`` as ``R W blockdiag(R2)^T``."""
    model = _model("llama", tied=False, biases=False)
    layer = model.model.layers[0]
    original = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    absorb_rotation(model, seed=7)

    generator = torch.Generator().manual_seed(7)
    stream, values = RandomizedHadamard(64, generator), RandomizedHadamard(16, generator)
    r = hadamard_matrix(64) * stream.signs / 8.0
    r2 = hadamard_matrix(16) * values.signs / 4.0
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    gain = original["model.layers.0.input_layernorm.weight"]
    expected = {
        "model.embed_tokens.weight": original["model.embed_tokens.weight"] @ r.T,
        "model.layers.1.mlp.down_proj.weight": r @ original["model.layers.1.mlp.down_proj.weight"],
        "model.layers.0.self_attn.v_proj.weight": torch.block_diag(r2, r2)
        @ original["model.layers.0.self_attn.v_proj.weight"]
        * gain
        @ r.T,
        "model.layers.0.self_attn.o_proj.weight": r
        @ original["model.layers.0.self_attn.o_proj.weight"]
        @ torch.block_diag(*[r2] * 4).T,
    }
    actual = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, rtol=0, atol=1e-6 * value.abs().max().item())
    assert bool((layer.input_layernorm.weight == 1).all())


def test_a_planted_outlier_channel_is_spread_over_the_stream() -> None:
    """What the rotation is for: a channel 50x larger than the rest becomes no larger than a few times
    the average, in the hidden states every reader of the stream sees."""
    model = _model("llama", tied=False, biases=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50.0
    tokens = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))

    def peak_to_rms() -> float:
        with torch.no_grad():
            hidden = model(tokens, output_hidden_states=True).hidden_states[1]
        return float((hidden.abs().amax() / hidden.pow(2).mean().sqrt()).item())

    before = peak_to_rms()
    absorb_rotation(model, seed=0)
    assert before > 5.0 and peak_to_rms() < before / 2


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_families_without_an_absorbable_stream_are_named(arch: str) -> None:
    model = build_model(arch)
    assert rotation_blockers(model)
    with pytest.raises(ConfigError) as err:
        absorb_rotation(model, seed=0)
    assert err.value.field == "rotation" and "model type" in str(err.value)


def test_rotation_and_lazy_load_are_refused_together() -> None:
    with pytest.raises(ConfigError) as err:
        validated(JobSettings, {"model": "m", "rotation": "hadamard", "lazy_load": True})
    assert err.value.field == "rotation"
    with pytest.raises(ConfigError) as err:
        validated(JobSettings, {"model": "m", "rotation": "givens"})
    assert err.value.field == "rotation"


def test_a_rotated_job_packs_and_the_packed_checkpoint_scores_as_reported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--out", str(tmp_path), *SMALL]
    extra = ["--bits", "4", "--rotation", "hadamard", "--export", "pack_quantized", "gguf", "--targets", "transformers"]
    assert main([*argv, *extra]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    score = report["runtimes"]["transformers"]
    assert score["ran"] and score["agrees"], score
    assert score["perplexity"]["persuasion"] == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=1e-5)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert not packed.config.tie_word_embeddings
    assert report["exports"]["gguf"]["block_type"] == "Q4_1"

    plain = tmp_path / "plain"
    assert (
        main(
            ["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--out", str(plain), *SMALL, "--bits", "4"]
        )
        == 0
    )
    unrotated = json.loads((plain / "report.json").read_text())
    # the float baseline is the user's model, scored before the rotation
    assert report["perplexity"]["persuasion"]["before"] == unrotated["perplexity"]["persuasion"]["before"]
    assert report["perplexity"]["persuasion"]["after"] != unrotated["perplexity"]["persuasion"]["after"]


def test_the_rotated_float_model_scores_as_the_original(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    windows = torch.randint(3, VOCAB, (3, 32), generator=torch.Generator().manual_seed(4))
    before = perplexity(model, windows, batch_size=2, device="cpu")
    absorb_rotation(model, seed=1)
    assert perplexity(model, windows, batch_size=2, device="cpu") == pytest.approx(before, rel=1e-5)
