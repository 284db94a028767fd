"""The suspended one-pass forward GPTQ uses for true-sequential stages, against the replay it replaces."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

import quant_core.methods.gptq as gptq_module
from quant_core.engine import block_forward, calibrate_blocks, capture_block_inputs
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import BlockData
from quant_core.methods.layer_inputs import input_groups, layer_input
from quant_core.methods.staged_pass import staged_pass
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.quantizer import QuantSpec
from tests.tiny_models import build_model

SPEC = QuantSpec(bits=3, group_size=32)
WINDOWS = torch.randint(3, 300, (7, 24), generator=torch.Generator().manual_seed(1))


def _quantized_weights(arch: str, options: dict[str, object]) -> tuple[dict[str, Tensor], list[float]]:
    model = build_model(arch)
    method = build_method("gptq", SPEC, build_loss("mse"), {"batch_size": 3, **options})
    records = calibrate_blocks(model, WINDOWS, method, build_loss("mse"), seed=0, forward_batch_size=3)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    return weights, [r.mse_after for r in records]


@pytest.mark.parametrize(("arch", "match_float"), [("llama", False), ("opt", False), ("llama", True)])
def test_one_staged_pass_gives_the_replays_weights_and_outputs_bit_for_bit(arch: str, match_float: bool) -> None:
    """Every stage's Hessian, hence every weight, and the chain fed to the next block are unchanged.

    Seven windows in batches of three also check a ragged last batch (and, with ``match_float``,
    that the full-precision inputs are paired with the right tokens either way). Tolerance: exact
    equality, since both paths run the same kernels on the same tensors in the same order.
    """
    staged, staged_mse = _quantized_weights(arch, {"staged_pass": True, "match_float": match_float})
    replayed, replayed_mse = _quantized_weights(arch, {"staged_pass": False, "match_float": match_float})
    assert staged.keys() == replayed.keys()
    for name in staged:
        assert torch.equal(staged[name], replayed[name]), name
    assert staged_mse == replayed_mse


def _block_data(model: nn.Module) -> tuple[nn.Module, BlockData]:
    block = find_decoder_blocks(model)[0]
    captured = capture_block_inputs(model, WINDOWS, "cpu")
    forward = block_forward(block, captured.kwargs)
    data = BlockData(0, 2, captured.hidden, None, forward, torch.Generator().manual_seed(0))
    return block, data


def _halve_stage(block: nn.Module, stages: Sequence[tuple[str, ...]]) -> Callable[[int, list[Tensor]], None]:
    """A stand-in quantizer that visibly changes each stage's weights."""
    linears = quantizable_linears(block)

    def change(index: int, _inputs: list[Tensor]) -> None:
        for name in stages[index]:
            linears[name].weight.data.mul_(0.5)

    return change


def test_stage_inputs_see_earlier_stages_changed_and_the_output_sees_them_all() -> None:
    block, data = _block_data(build_model("llama"))
    stages = input_groups(block, data)
    assert len(stages) == 4  # q/k/v, o, gate/up, down
    seen: dict[int, Tensor] = {}
    change = _halve_stage(block, stages)

    def record_then_change(index: int, inputs: list[Tensor]) -> None:
        seen[index] = torch.cat(inputs)
        change(index, inputs)

    output = staged_pass(block, data, stages, record_then_change, batch_size=3)
    # after the pass every stage is halved; a plain forward of the changed block must agree exactly
    assert torch.equal(output, _plain(block, data))
    # each stage's inputs are what the block feeds that linear once the stages before it changed
    for index in (1, 2, 3):
        reference = model_inputs_with_stages_changed(data, stages, index)
        assert torch.equal(seen[index], reference), index


def _plain(block: nn.Module, data: BlockData) -> Tensor:
    with torch.no_grad():
        return torch.cat([data.forward(h, None) for h in data.inputs.split(3)])


def model_inputs_with_stages_changed(data: BlockData, stages: Sequence[tuple[str, ...]], index: int) -> Tensor:
    """Stage ``index``'s input, replayed on a fresh copy of the block with stages ``0..index-1`` halved."""
    fresh = build_model("llama")
    block, fresh_data = _block_data(fresh)
    linears = quantizable_linears(block)
    for stage in stages[:index]:
        for name in stage:
            linears[name].weight.data.mul_(0.5)
    with torch.no_grad():
        return torch.cat([layer_input(block, fresh_data, h, stages[index][0]) for h in fresh_data.inputs.split(3)])


def test_an_error_in_a_stage_unwinds_every_paused_batch() -> None:
    block, data = _block_data(build_model("llama"))
    stages = input_groups(block, data)
    before = threading.active_count()

    def fail_at_second(index: int, inputs: list[Tensor]) -> None:
        if index == 1:
            raise ValueError("stage failed")
        _halve_stage(block, stages)(index, inputs)

    with pytest.raises(ValueError, match="stage failed"):
        staged_pass(block, data, stages, fail_at_second, batch_size=2)
    assert threading.active_count() == before
    # the block still runs normally afterwards (no hook left behind that would pause it)
    assert _plain(block, data).shape == data.inputs.shape


def test_running_out_of_memory_mid_pass_falls_back_to_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages quantized before the failure stay; the rest replay; the weights equal the replay's."""
    real = gptq_module.staged_pass

    def out_of_memory_at_third_stage(block, data, stages, quantize_stage, batch_size):  # type: ignore[no-untyped-def]
        def quantize(index: int, inputs: list[Tensor]) -> None:
            if index == 2:
                raise torch.OutOfMemoryError("device memory exhausted")
            quantize_stage(index, inputs)

        return real(block, data, stages, quantize, batch_size)

    monkeypatch.setattr(gptq_module, "staged_pass", out_of_memory_at_third_stage)
    fallen_back, _ = _quantized_weights("llama", {"staged_pass": True})
    monkeypatch.undo()
    replayed, _ = _quantized_weights("llama", {"staged_pass": False})
    for name in replayed:
        assert torch.equal(fallen_back[name], replayed[name]), name


def test_outputs_kept_by_the_base_are_not_fed_forward_once_a_refinement_changed_the_weights() -> None:
    """NormTweaking trains the norms after GPTQ kept its outputs: the engine must run the block again.

    The records' ``mse_after`` compare the outputs fed forward with the full-precision targets, so a
    stale chain would show as a difference against the same job with the replay (which keeps none).
    """

    def after(base_options: dict[str, object]) -> list[float]:
        model = build_model("llama")
        method = build_method("normtweaking", SPEC, build_loss("mse"), {"base_options": base_options, "lr": 1e-2})
        return [r.mse_after for r in calibrate_blocks(model, WINDOWS, method, build_loss("mse"), seed=0)]

    assert after({"staged_pass": True}) == after({"staged_pass": False})


def test_by_default_the_pass_is_staged_on_one_cpu_thread_and_replayed_on_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several CPU threads: each paused batch's thread would bring its own OpenMP team (slower, measured)."""
    calls: list[int] = []
    real = gptq_module.staged_pass

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "staged_pass", counted)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _quantized_weights("llama", {})
        staged_calls = len(calls)
        torch.set_num_threads(2)
        _quantized_weights("llama", {})
    finally:
        torch.set_num_threads(threads)
    assert staged_calls == 2 and len(calls) == 2  # one per block with one thread, none with two
