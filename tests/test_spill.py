"""Activations on disk (quant_core/spill.py): file-backed, unlinked, and results unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from quant_core.engine import calibrate_blocks
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.quantizer import QuantSpec
from quant_core.spill import Spill, available_bytes, spilled
from tests.tiny_models import build_model


def test_a_large_tensor_moves_to_an_unlinked_file_and_a_small_one_stays(tmp_path: Path) -> None:
    tensor = torch.randn(3, 5, 7)
    stored = Spill(tmp_path, threshold_bytes=tensor.numel() * 4).keep(tensor)
    assert spilled(stored) and not spilled(tensor)
    assert torch.equal(stored, tensor) and stored.shape == tensor.shape and stored.is_contiguous()
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped
    stored += 1  # a private copy: the original is untouched
    assert torch.equal(stored, tensor + 1)
    assert Spill(tmp_path, threshold_bytes=tensor.numel() * 4 + 1).keep(tensor) is tensor
    assert Spill(tmp_path).keep(tensor) is tensor  # far below an eighth of the available memory
    assert available_bytes() > 0


class _Counting(Spill):
    """The real spill, counting the tensors it moved to disk."""

    moved: list[tuple[int, ...]]

    def keep(self, tensor: Tensor) -> Tensor:
        stored = super().keep(tensor)
        if spilled(stored):
            self.moved.append(tuple(stored.shape))
        return stored


def test_chains_on_disk_give_the_same_blocks(tmp_path: Path) -> None:
    """GPTQ on a tiny Llama with every chain spilled between blocks (threshold 0) writes the same weights
    and records as with the chains in memory."""
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    for spill in (None, _Counting(tmp_path / "spill", threshold_bytes=0)):
        if spill is not None:
            object.__setattr__(spill, "moved", [])
        model = build_model("llama")
        method = build_method("gptq", QuantSpec(4, False, 32), build_loss("mse"))
        records = calibrate_blocks(model, windows, method, build_loss("mse"), spill=spill)
        runs.append((records, model.state_dict(), spill))
    (plain, plain_state, _), (spilled_records, spilled_state, spill) = runs
    assert [r.loss_after for r in plain] == [r.loss_after for r in spilled_records]
    assert all(torch.equal(value, spilled_state[name]) for name, value in plain_state.items())
    assert spill is not None and len(spill.moved) == 2 * (1 + len(plain))  # both chains, at start and per block
