"""The GGUF export: block bytes decoded by the gguf package's own dequantizer, a job's file read back
tensor by tensor, and the file run in llama.cpp where llama-cpp-python is installed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quant_core.cli import main
from quant_core.gguf_export import gguf_blocks
from quant_core.quantizer import QuantSpec, grid_codes, group_columns, scale_and_zero
from quant_core.runtimes import AGREEMENT, RuntimeUnavailable, runtime_interpreter
from tests.test_cli import SMALL

BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}


def _grid(spec: QuantSpec, rows: int = 6, cols: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random weights' codes ``[rows, cols]`` with their scale (float16 values) and zero ``[rows, groups]``."""
    torch.manual_seed(spec.bits)
    grouped = group_columns(torch.randn(rows, cols) * 0.05, spec.group_size)
    scale, zero = scale_and_zero(grouped, spec)
    scale = scale.half().float()
    codes = grid_codes(grouped, scale, zero, spec).reshape(rows, cols)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize(("bits", "symmetric"), list(BLOCK_TYPES))
def test_blocks_decode_to_the_grid_values(bits: int, symmetric: bool, group_size: int | None) -> None:
    """Tolerance: none for symmetric grids (d is the float16 scale itself); an asymmetric block stores
    its minimum -zero * scale in float16, so a value may move by half a float16 step of that minimum."""
    spec = QuantSpec(bits, symmetric, group_size)
    codes, scale, zero = _grid(spec)
    data = gguf_blocks(codes, scale, zero, spec)
    decoded = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[BLOCK_TYPES[bits, symmetric]]))
    expected_scale, expected_zero = (
        t.repeat_interleave(group_size, dim=1) if group_size else t.expand_as(codes) for t in (scale, zero)
    )
    expected = (codes - expected_zero) * expected_scale
    if symmetric:
        assert torch.equal(decoded, expected)
    else:
        minimum = (expected_zero + 2 ** (bits - 1)) * expected_scale
        assert bool(((decoded - expected).abs() <= minimum.abs() * 2.0**-11 + 1e-12).all())


def _job(model_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["quantize", "--model", str(model_dir), "--method", "gptq", "--out", str(out), *SMALL, "--bits", "4"]
    assert main([*argv, *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _unpermute_rope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, per_head // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


BUDGET_4_5_8 = ["--budget-bits", "5.4", *(f"--budget-widths={b}" for b in (4, 5, 8)), "--budget-group-sizes", "32"]


def _block_types(report: dict) -> dict[str, str]:
    """The GGUF type each block linear must have: its scheme's (a budget's allocation), else the file's."""
    block_type = report["exports"]["gguf"]["block_type"]
    names = [f"{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    if report["allocation"] is None:
        return dict.fromkeys(names, block_type)
    kinds = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0"}
    return {
        f"{unit['block']}.{name}": kinds[(unit["bits"], unit["symmetric"])]
        for unit in report["allocation"]["units"]
        for name in unit["linears"]
    }


@pytest.mark.parametrize(
    ("symmetric", "budget"), [(False, []), (True, []), (True, BUDGET_4_5_8)], ids=["asym", "sym", "budget-4-5-8"]
)
def test_a_jobs_gguf_holds_the_fake_quant_weights_and_the_tokenizer(
    symmetric: bool, budget: list[str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Each block linear in the block type of its scheme: one type for a uniform job, a size budget's
    allocation tensor by tensor (GGUF types each tensor on its own)."""
    from transformers import AutoModelForCausalLM

    extra = ["--export", "fake_quant", "gguf", *(["--symmetric"] if symmetric else []), *budget]
    report = _job(tiny_llama_dir, tmp_path, *extra)
    details = report["exports"]["gguf"]
    assert details["tokenizer_pre"] == "gpt-2"
    if budget:
        assert len(details["block_types"]) > 1 and details["block_type"] in details["block_types"]
    else:
        assert details["block_type"] == ("Q4_0" if symmetric else "Q4_1")
    types = _block_types(report)
    reader = gguf.GGUFReader(tmp_path / details["path"] / details["file"])
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / report["exports"]["fake_quant"]["path"]).float()
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors or not fake.config.tie_word_embeddings
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_down": "mlp.down_proj"}
    for index in range(2):
        for gguf_name, hf_name in names.items():
            tensor = tensors[f"blk.{index}.{gguf_name}.weight"]
            assert tensor.tensor_type.name == types[f"{index}.{hf_name}"]
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            heads = {"attn_q": fake.config.num_attention_heads, "attn_k": fake.config.num_key_value_heads}
            if gguf_name in heads:
                weight = _unpermute_rope_rows(weight, heads[gguf_name])
            expected = fake.get_submodule(f"model.layers.{index}.{hf_name}").weight.detach().numpy()
            # The fake-quant checkpoint holds each grid value rounded to bfloat16 (half a step: up to 2^-8 of it),
            # GGUF the value itself; asymmetric minimums are float16-rounded, at most 2^-11 of a group's range.
            atol = 0 if symmetric else 2.0**-11 * 2 * np.abs(expected).max()
            np.testing.assert_allclose(weight, expected, rtol=2.0**-8, atol=atol)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == fake.config.vocab_size and tokens[1] == "<s>"


def test_targets_refuse_grids_the_runtime_cannot_run_before_calibration(
    tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--targets", "llama.cpp"]) == 2  # SMALL asks for 3 bits
    assert "targets" in capsys.readouterr().err
    assert main([*argv, "--bits", "4", "--method-opt", "incoherence=hadamard", "--targets", "vllm"]) == 2
    assert "rotated basis" in capsys.readouterr().err
    assert main([*argv, "--bits", "4", "--group-size", "16", "--export", "gguf"]) == 2
    assert "export_formats" in capsys.readouterr().err and not (tmp_path / "report.json").exists()


def _llamacpp() -> str:
    try:
        return runtime_interpreter("llama.cpp")
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(
    "extra", [["--group-size", "64"], ["--symmetric", "--group-size", "32"], ["--symmetric", *BUDGET_4_5_8]]
)
def test_llama_cpp_scores_the_gguf_as_the_report_does(
    extra: list[str], tiny_llama_dir: Path, tmp_path: Path, tokenizer
) -> None:
    """llama.cpp quantizes activations to 8 bits for its integer dot products: AGREEMENT (2%) of the
    report's perplexity, which it meets here by two orders of magnitude."""
    interpreter = _llamacpp()
    report = _job(tiny_llama_dir, tmp_path, *extra, "--targets", "llama.cpp")
    score = report["runtimes"]["llama.cpp"]
    assert score["ran"] and score["agrees"], score
    assert abs(score["relative_difference"]["persuasion"]) < AGREEMENT / 10
    assert score["perplexity"]["persuasion"] == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=2e-3)

    text = "Anne Elliot walked to the Cobb with Louisa."
    tokenize = (
        "import json, sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False); "
        "print(json.dumps(m.tokenize(sys.argv[2].encode(), add_bos=False, special=False)))"
    )
    gguf_file = str(tmp_path / report["exports"]["gguf"]["path"] / report["exports"]["gguf"]["file"])
    done = subprocess.run([interpreter, "-c", tokenize, gguf_file, text], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_gguf_names_each_thing_it_cannot_hold() -> None:
    from transformers import LlamaConfig, Qwen2Config

    from quant_core.gguf_export import gguf_blockers

    assert gguf_blockers(LlamaConfig(hidden_size=64, intermediate_size=128), QuantSpec(4, False, 64), False) == []
    qwen = gguf_blockers(Qwen2Config(hidden_size=64, intermediate_size=128), QuantSpec(4, False, 64), False)
    assert any("model type qwen2" in reason for reason in qwen)
    biased = LlamaConfig(hidden_size=64, intermediate_size=128, attention_bias=True)
    assert any("biases" in reason for reason in gguf_blockers(biased, QuantSpec(4, False, 32), False))
    llama3 = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    reasons = " | ".join(gguf_blockers(llama3, QuantSpec(8, False, 48), True))
    for expected in ("RoPE type llama3", "W8A16 g48 asym", "group_size 48", "rotated basis"):
        assert expected in reasons
