"""Each unit's measured cost under each scheme, against a naive measurement on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch

from quant_core.allocation import storage_bits
from quant_core.losses import build_loss
from quant_core.model_structure import find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec, fake_quantize
from quant_core.sensitivity import measure_unit_costs
from tests.tiny_models import build_model

SCHEMES = (
    QuantSpec(bits=2, group_size=32),
    QuantSpec(bits=4, group_size=32),
    QuantSpec(bits=4, group_size=None, symmetric=True),
)


def _block_outputs(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output on ``windows`` through hooks, one window at a time as the engine runs them."""
    outputs: list[list[torch.Tensor]] = []
    handles = []
    for block in find_decoder_blocks(model):
        seen: list[torch.Tensor] = []
        outputs.append(seen)
        handles.append(
            block.register_forward_hook(
                lambda _m, _a, out, seen=seen: seen.append(out[0] if isinstance(out, tuple) else out)
            )
        )
    with torch.no_grad():
        for window in windows:
            model(input_ids=window.unsqueeze(0), use_cache=False)
    for handle in handles:
        handle.remove()
    return [torch.cat(seen) for seen in outputs]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_units_cost_is_the_block_output_loss_with_only_that_unit_rounded(arch: str) -> None:
    """The reference quantizes the unit in place in a copy of the whole model and reads the block's
    output through a hook: blocks before it are untouched, so the block sees full-precision inputs.
    Tolerance 1e-5 relative: the same float32 operations in another order."""
    model = build_model(arch, layers=2)
    windows = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    before = {name: p.clone() for name, p in model.named_parameters()}
    units = measure_unit_costs(model, windows, SCHEMES, build_loss("mse"), batch_size=2)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # measured, not modified
    float_outputs = _block_outputs(model, windows)
    blocks = find_decoder_blocks(model)
    assert [u.block for u in units] == sorted(u.block for u in units) and {u.block for u in units} == {0, 1}
    for unit in units:
        linears = quantizable_linears(blocks[unit.block])
        assert set().union(*(u.linears for u in units if u.block == unit.block)) == set(linears)
        for scheme, choice in zip(SCHEMES, unit.choices, strict=True):
            altered = copy.deepcopy(model)
            altered_linears = quantizable_linears(find_decoder_blocks(altered)[unit.block])
            with torch.no_grad():
                for name in unit.linears:
                    layer = altered_linears[name]
                    quantized = fake_quantize(weight_matrix(layer).float(), scheme)
                    layer.weight.copy_(quantized if isinstance(layer, torch.nn.Linear) else quantized.T)
            reference = torch.mean((_block_outputs(altered, windows)[unit.block] - float_outputs[unit.block]) ** 2)
            assert choice.cost == pytest.approx(reference.item(), rel=1e-5)
            assert choice.size_bits == sum(storage_bits(*weight_matrix(linears[n]).shape, scheme) for n in unit.linears)


def test_linears_that_read_one_input_form_one_unit() -> None:
    """q/k/v read the same normalized hidden state and gate/up the same one: each pair of runtimes'
    fused matrices must share a scheme."""
    model = build_model("llama", layers=1)
    windows = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    units = measure_unit_costs(model, windows, SCHEMES[:1], build_loss("mse"))
    assert [unit.linears for unit in units] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]


def test_wider_schemes_cost_less_on_every_unit() -> None:
    model = build_model("llama", layers=2)
    windows = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    units = measure_unit_costs(
        model,
        windows,
        (QuantSpec(bits=2, group_size=32), QuantSpec(bits=3, group_size=32), QuantSpec(bits=8, group_size=32)),
        build_loss("mse"),
    )
    for unit in units:
        costs = [choice.cost for choice in unit.choices]
        sizes = [choice.size_bits for choice in unit.choices]
        assert costs[0] > costs[1] > costs[2] and sizes[0] < sizes[1] < sizes[2]
