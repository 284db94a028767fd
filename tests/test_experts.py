"""Mixtures of experts (quant_core/experts.py) on tiny Mixtral-, Qwen2-MoE- and Qwen3-MoE-shaped models.

References are independent of the code under test: transformers' own fused experts for the outputs,
and a per-token loop over the router's softmax for the routing (top-k by sorting each token's row).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from quant_core.cli import build_parser, settings_from_args
from quant_core.corpus import BUNDLED_TEXTS
from quant_core.errors import ConfigError
from quant_core.experts import (
    ExpertList,
    ExpertMLP,
    expert_calibration,
    expert_lists,
    routed_tokens,
    unfuse_experts,
)
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import JobSettings
from quant_core.model_io import load_model
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec
from tests.tiny_models import MOE_FAMILIES, build_model, build_tokenizer

MOE = sorted(MOE_FAMILIES)


def _ids(seed: int = 0, windows: int = 3, length: int = 24) -> Tensor:
    """Windows of real text (the bundled Austen, tokenized), at seeded offsets."""
    text = BUNDLED_TEXTS["austen"].read_text(encoding="utf-8")[:50_000]
    tokens = torch.tensor(build_tokenizer()(text).input_ids)
    starts = torch.randint(0, tokens.numel() - length, (windows,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[start : start + length] for start in starts.tolist()])


@pytest.mark.parametrize("family", MOE)
def test_split_experts_compute_what_transformers_fused_experts_compute(family: str) -> None:
    """Logits of the split model equal the fused model's (1e-5 of their scale), routed sparsely as the
    model runs and with every expert on every token as calibration runs them."""
    model = build_model(family)
    ids = _ids()
    with torch.no_grad():
        fused = model(ids).logits
    assert unfuse_experts(model) == (1 if family == "qwen3_moe" else 2)
    assert not any(p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        split = model(ids).logits
        for experts in expert_lists(model).values():
            experts.fallback = frozenset({0, 3})
        every = model(ids).logits
    tolerance = 1e-5 * fused.abs().max().item()
    assert (split - fused).abs().max().item() <= tolerance
    assert (every - fused).abs().max().item() <= tolerance


def _router_inputs(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """What the block's router reads when the block runs on ``hidden``, ``[tokens, H]``."""
    seen: list[Tensor] = []
    handle = block.mlp.gate.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            block(hidden, **kwargs)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def _naive_routing(router_weight: Tensor, tokens: Tensor, top_k: int) -> list[list[int]]:
    """Each token's experts: the k largest router probabilities, one token at a time."""
    chosen = []
    for token in tokens:
        probabilities = torch.softmax(router_weight.double() @ token.double(), dim=0).tolist()
        chosen.append(sorted(range(len(probabilities)), key=lambda e: -probabilities[e])[:top_k])
    return chosen


def _block_and_inputs(family: str) -> tuple[nn.Module, Tensor, dict]:
    """The model's last (sparse) block, unfused, and what it receives on a few windows."""
    from quant_core.engine import capture_block_inputs

    model = build_model(family)
    unfuse_experts(model)
    captured = capture_block_inputs(model, _ids(1, windows=4, length=32), "cpu")
    blocks = find_decoder_blocks(model)
    # the block's own inputs: run the earlier blocks (Qwen3-MoE's first is dense)
    hidden = captured.hidden
    with torch.no_grad():
        for block in list(blocks)[:-1]:
            out = block(hidden, **captured.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    return blocks[-1], hidden, captured.kwargs


@pytest.mark.parametrize("family", MOE)
def test_routed_token_counts_match_a_naive_top_k_routing(family: str) -> None:
    block, hidden, kwargs = _block_and_inputs(family)
    counts = routed_tokens(block, lambda h: block(h, **kwargs), hidden, batch_size=3)
    tokens = _router_inputs(block, hidden, kwargs)
    routing = _naive_routing(block.mlp.gate.weight, tokens, block.mlp.gate.top_k)
    expected = [sum(e in chosen for chosen in routing) for e in range(len(block.mlp.experts))]
    assert list(counts) == ["mlp.experts"] and counts["mlp.experts"].tolist() == expected
    assert sum(expected) == tokens.shape[0] * block.mlp.gate.top_k
    print(family, "tokens routed to each expert:", expected)


@pytest.mark.parametrize("family", MOE)
def test_routed_experts_see_only_their_tokens_and_rare_ones_every_token(family: str) -> None:
    """Under calibration each expert's linears get every row, the rows of tokens routed elsewhere zero:
    ``X^T X`` equals that of its routed tokens alone (rel 1e-5), and an expert under the threshold gets
    every token's. The block's output does not change (1e-6 of its scale)."""
    block, hidden, kwargs = _block_and_inputs(family)
    tokens = _router_inputs(block, hidden, kwargs)
    routing = _naive_routing(block.mlp.gate.weight, tokens, block.mlp.gate.top_k)
    counts = torch.tensor([sum(e in chosen for chosen in routing) for e in range(len(block.mlp.experts))])
    threshold = int(counts.float().median().item())
    with torch.no_grad():
        plain = block(hidden, **kwargs)
    plain = plain[0] if isinstance(plain, tuple) else plain
    experts: ExpertList = block.mlp.experts
    seen: dict[int, list[Tensor]] = {}
    with expert_calibration(block, lambda h: block(h, **kwargs), hidden, 2, threshold) as report, torch.no_grad():
        handles = [
            expert.get_submodule(expert.names[0]).register_forward_pre_hook(
                lambda _m, args, index=index: seen.setdefault(index, []).append(args[0].detach().clone())
            )
            for index, expert in enumerate(experts)
            if isinstance(expert, ExpertMLP)
        ]
        out = block(hidden, **kwargs)
        for handle in handles:
            handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    assert (out - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()
    assert experts.fallback is None  # restored on exit
    stats = report["mlp.experts"]
    assert stats["routed_tokens"] == counts.tolist() and stats["min_tokens"] == threshold
    assert stats["fallback"] == [e for e in range(len(counts)) if counts[e] < threshold]
    assert 0 < len(stats["fallback"]) < len(counts)
    for index in range(len(experts)):
        x = torch.cat(seen[index])
        assert x.shape[0] == tokens.shape[0]  # every expert runs on every token
        if index in stats["fallback"]:
            reference = tokens
        else:
            reference = tokens[[t for t, chosen in enumerate(routing) if index in chosen]]
        gram, expected = x.T.double() @ x.double(), reference.T.double() @ reference.double()
        assert torch.allclose(gram, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item()), index


def test_routers_and_the_shared_expert_gate_stay_out_of_the_quantized_linears() -> None:
    model = build_model("qwen2_moe")
    unfuse_experts(model)
    names = set(quantizable_linears(find_decoder_blocks(model)[1]))
    assert "mlp.shared_expert_gate" not in names and "mlp.gate" not in names
    assert {"mlp.shared_expert.gate_proj", "mlp.experts.7.down_proj", "self_attn.q_proj"} <= names


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for family in ("mixtral", "qwen2_moe"):
        path = tmp_path_factory.mktemp(family)
        build_model(family).save_pretrained(path, safe_serialization=True)
        build_tokenizer().save_pretrained(path)
        dirs[family] = path
    return dirs


def _spec(model: Path, symmetric: bool, **settings) -> JobSpec:
    return JobSpec(
        model=str(model),
        quant=QuantSpec(4, symmetric, 32),
        method="gptq",
        calibration=CalibrationSpec(n_samples=4, seq_len=32, expert_min_tokens=settings.pop("expert_min_tokens", None)),
        evaluation=EvaluationSpec(max_windows=2),
        **settings,
    )


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_job_reports_each_experts_tokens_keeps_routers_and_packs_the_published_layout(
    family: str, moe_dirs: dict[str, Path], tmp_path: Path
) -> None:
    source = moe_dirs[family]
    report = run_job(_spec(source, True, export_formats=("pack_quantized",), expert_min_tokens=20), tmp_path)
    for record in report.blocks:
        stats = record.method_stats["experts"]["mlp.experts"]
        assert sum(stats["routed_tokens"]) == 4 * 32 * 2 and stats["tokens"] == 4 * 32
        assert stats["min_tokens"] == 20
        assert stats["fallback"] == [e for e, n in enumerate(stats["routed_tokens"]) if n < 20]
    original, _ = load_model(str(source))
    packed = tmp_path / report.exports["pack_quantized"].path
    routers = {"mixtral": ["block_sparse_moe.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"]}[family]
    experts = {"mixtral": "block_sparse_moe.experts", "qwen2_moe": "mlp.experts"}[family]
    down = {"mixtral": "w2", "qwen2_moe": "down_proj"}[family]
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    with safe_open(str(packed / "model.safetensors"), "pt") as stored:
        keys = set(stored.keys())
        for layer in (0, 1):
            for router in routers:
                assert f"model.layers.{layer}.{router}" in config["ignore"]
                weight = stored.get_tensor(f"model.layers.{layer}.{router}.weight")
                module = original.get_submodule(f"model.layers.{layer}.{router.replace('block_sparse_moe', 'mlp')}")
                assert torch.equal(weight, module.weight.to(weight.dtype))  # never quantized
            assert {f"model.layers.{layer}.{experts}.{e}.{down}.weight_packed" for e in range(8)} <= keys
    assert not any(key.endswith("weight_zero_point") for key in keys)


def test_a_packed_mixture_of_experts_needs_symmetric_grids(moe_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="symmetric") as info:
        run_job(_spec(moe_dirs["mixtral"], False, export_formats=("pack_quantized",)), tmp_path / "packed")
    assert info.value.field == "symmetric" and not (tmp_path / "packed" / "report.json").exists()
    report = run_job(_spec(moe_dirs["mixtral"], False), tmp_path / "auto")
    assert set(report.exports) == {"fake_quant"}


def test_the_expert_threshold_flows_from_flag_and_rest_into_the_job() -> None:
    args = build_parser().parse_args(["quantize", "--model", "m", "--expert-min-tokens", "0"])
    assert JobSpec.from_settings(settings_from_args(args)[0]).calibration.expert_min_tokens == 0
    rest = JobSettings.model_validate({"model": "m", "calibration": {"expert_min_tokens": 64}})
    assert JobSpec.from_settings(rest).calibration.expert_min_tokens == 64
    with pytest.raises(ValueError, match="expert_min_tokens"):
        JobSettings.model_validate({"model": "m", "calibration": {"expert_min_tokens": -1}})
