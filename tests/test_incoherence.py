"""QuIP incoherence processing against independent references: SciPy's Sylvester matrices, Paley's
construction written as a plain loop over quadratic residues, and dense rotation matrices.

Tolerances: float64 transforms agree with dense products to 1e-12 (a few dozen additions of ±1/sqrt(n)
terms); float32 round trips to 1e-5 of the weight scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.linalg
import torch
from torch import nn

from quant_core.cli import main
from quant_core.errors import ConfigError
from quant_core.incoherence import (
    LinearRotation,
    RandomizedHadamard,
    hadamard_factors,
    hadamard_matrix,
    has_hadamard,
    paley_i,
    paley_ii,
    rotate_hessian,
)
from quant_core.job_settings import JobSettings, validated
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import layer_grid, rotated_rtn_weights
from quant_core.model_io import load_model
from quant_core.quantizer import QuantSpec, fake_quantize, group_columns

SMALL = ["--n-samples", "4", "--seq-len", "32", "--eval-max-windows", "2", "--bits", "3", "--group-size", "32"]


def naive_paley_i(q: int) -> torch.Tensor:
    """Paley I by definition: H = I + S, S[0, j] = 1, S[i, 0] = -1, S[i, j] = chi(j - i), chi by listing squares."""
    squares = {(k * k) % q for k in range(1, q)}
    h = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    for i in range(q + 1):
        for j in range(q + 1):
            if i == j or i == 0:
                h[i, j] = 1.0
            elif j == 0:
                h[i, j] = -1.0
            else:
                h[i, j] = 1.0 if (j - i) % q in squares else -1.0
    return h


def naive_paley_ii(q: int) -> torch.Tensor:
    """Paley II by definition: the symmetric conference matrix with each entry replaced by a 2 x 2 block."""
    squares = {(k * k) % q for k in range(1, q)}
    h = torch.zeros(2 * (q + 1), 2 * (q + 1), dtype=torch.float64)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for i in range(q + 1):
        for j in range(q + 1):
            if i == j:
                block = zero_block
            elif i == 0 or j == 0:
                block = sign_block
            else:
                block = sign_block if (j - i) % q in squares else -sign_block
            h[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
    return h


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
def test_power_of_two_hadamard_is_scipys_sylvester_matrix(n: int) -> None:
    assert torch.equal(hadamard_matrix(n), torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 31, 43])
def test_paley_i_matches_the_definition(q: int) -> None:
    assert torch.equal(paley_i(q), naive_paley_i(q))


@pytest.mark.parametrize("q", [5, 13, 17, 29])
def test_paley_ii_matches_the_definition(q: int) -> None:
    assert torch.equal(paley_ii(q), naive_paley_ii(q))


@pytest.mark.parametrize("n", [12, 20, 24, 28, 36, 44, 48, 60, 144, 192, 576, 1536, 2304])
def test_built_matrices_are_hadamard(n: int) -> None:
    """Entries ±1 and H H^T = n I exactly (integer arithmetic in float64)."""
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_smollm2_widths_use_small_factors() -> None:
    assert [f.shape[0] for f in hadamard_factors(576)] == [36, 16]
    assert [f.shape[0] for f in hadamard_factors(1536)] == [12, 128]
    assert [f.shape[0] for f in hadamard_factors(192)] == [12, 16]


@pytest.mark.parametrize("n", [3, 6, 10, 52, 100])
def test_a_width_without_a_construction_is_refused_naming_the_option(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(ConfigError, match=f"order {n}") as info:
        hadamard_factors(n, "method_options.incoherence")
    assert info.value.field == "method_options.incoherence"


@pytest.mark.parametrize("n", [16, 12, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_matches_the_dense_product(n: int) -> None:
    rotation = RandomizedHadamard(n, torch.Generator().manual_seed(n))
    dense = hadamard_matrix(n) @ torch.diag(rotation.signs) / n**0.5  # H diag(s) / sqrt(n), built explicitly
    assert torch.allclose(rotation.matrix(), dense, atol=1e-12)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rotation.apply(x), x @ dense.T, atol=1e-12)
    assert torch.allclose(rotation.apply_transpose(x), x @ dense, atol=1e-12)
    # along the first dimension (the output side of a weight): R x and R^T x for x of shape [n, 5]
    assert torch.allclose(rotation.apply(x.T.contiguous(), dim=0), dense @ x.T, atol=1e-12)
    assert torch.allclose(rotation.apply_transpose(x.T.contiguous(), dim=0), dense.T @ x.T, atol=1e-12)
    # along a middle dimension of a 3-D tensor
    x3 = torch.randn(2, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(rotation.apply(x3, dim=1), torch.einsum("ij,bjk->bik", dense, x3), atol=1e-12)


def test_weight_rotation_is_u_w_vt_and_restores_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(192, 576, dtype=torch.float64, generator=generator)
    rotation = LinearRotation.draw(192, 576, generator)
    u, v = rotation.out_rotation.matrix(), rotation.in_rotation.matrix()
    assert torch.allclose(rotation.rotate(weight), u @ weight @ v.T, atol=1e-12)
    assert torch.allclose(rotation.restore(rotation.rotate(weight)), weight, atol=1e-12)
    weight32 = weight.float()
    assert (rotation.restore(rotation.rotate(weight32)) - weight32).abs().max() < 1e-5 * weight32.abs().max()


def test_rotated_layer_computes_the_same_outputs_on_the_rotated_input() -> None:
    """y = W x = U^T (U W V^T) (V x): the rotation changes nothing before rounding."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 48, dtype=torch.float64, generator=generator)
    x = torch.randn(7, 48, dtype=torch.float64, generator=generator)
    rotation = LinearRotation.draw(24, 48, generator)
    rotated_out = rotation.in_rotation.apply(x) @ rotation.rotate(weight).T
    assert torch.allclose(rotation.out_rotation.apply_transpose(rotated_out), x @ weight.T, atol=1e-12)


def test_hessian_rotation_is_v_h_vt() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(100, 48, dtype=torch.float64, generator=generator)
    hessian = x.T @ x
    rotation = RandomizedHadamard(48, generator)
    v = rotation.matrix()
    assert torch.allclose(rotate_hessian(hessian, rotation), v @ hessian @ v.T, atol=1e-10)


def test_incoherence_spreads_an_outlier() -> None:
    """A single large weight becomes many small ones: the max/Frobenius ratio drops (QuIP Sec. 4)."""
    weight = torch.zeros(64, 64, dtype=torch.float64)
    weight[3, 5] = 1.0
    rotated = LinearRotation.draw(64, 64, torch.Generator().manual_seed(0)).rotate(weight)
    assert rotated.abs().max().item() == pytest.approx(1 / 64)


def test_signs_are_reproducible_by_seed() -> None:
    first = RandomizedHadamard(576, torch.Generator().manual_seed(7)).signs
    again = RandomizedHadamard(576, torch.Generator().manual_seed(7)).signs
    other = RandomizedHadamard(576, torch.Generator().manual_seed(8)).signs
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_rotated_rtn_is_rounding_in_the_rotated_basis_undone() -> None:
    """Reference: dense U and V from the same draws, U^T rtn(U W V^T) V; rotated back, each group is on the grid."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(48, 24, bias=False), nn.Linear(24, 48, bias=False))
    spec = QuantSpec(bits=3, group_size=16)
    ours = rotated_rtn_weights(block, {"0": spec, "1": spec}, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    for name, layer in (("0", block[0]), ("1", block[1])):
        rotation = LinearRotation.draw(*layer.weight.shape, generator)
        u, v = rotation.out_rotation.matrix().float(), rotation.in_rotation.matrix().float()
        rounded = fake_quantize(u @ layer.weight.detach() @ v.T, spec)
        assert torch.allclose(ours[name], u.T @ rounded @ v, atol=1e-5)
        back = group_columns(rotation.rotate(ours[name].double()), 16)
        # Distinct values up to round-off: a gap above 1e-6 of the group's range starts a new level.
        ordered = back.sort(dim=-1).values
        gaps = ordered.diff(dim=-1) > 1e-6 * (ordered[..., -1:] - ordered[..., :1])
        assert (1 + gaps.sum(dim=-1) <= 2**spec.bits).all()


def test_a_model_width_without_a_construction_is_refused_before_calibration() -> None:
    method = build_method("gptq", QuantSpec(bits=3), build_loss("mse"), {"incoherence": "hadamard"})
    with pytest.raises(ConfigError, match="order 52") as info:
        method.check(nn.ModuleList([nn.Sequential(nn.Linear(52, 64))]))
    assert info.value.field == "method_options.incoherence"


@pytest.mark.parametrize(
    ("method", "options", "field"),
    [
        ("rtn", {"incoherence": "hadamard"}, "method_options.incoherence"),
        ("gptq", {"incoherence": "hadamard"}, "method_options.incoherence"),
        ("discquant", {"incoherence": "hadamard"}, "method_options.incoherence"),
        ("normtweaking", {"base_options": {"incoherence": "hadamard"}}, "method_options.base_options.incoherence"),
    ],
)
def test_packed_export_with_incoherence_is_refused_up_front(method: str, options: dict, field: str) -> None:
    body = {"model": "m", "method": method, "method_options": options}
    with pytest.raises(ConfigError, match="no packed format holds") as info:
        validated(JobSettings, {**body, "export_formats": ["fake_quant", "pack_quantized"]})
    assert info.value.field == field


@pytest.mark.parametrize("method", ["rtn", "gptq", "discquant"])
def test_unknown_incoherence_names_the_option(method: str) -> None:
    with pytest.raises(ConfigError, match="none, hadamard") as info:
        validated(JobSettings, {"model": "m", "method": method, "method_options": {"incoherence": "random"}})
    assert info.value.field == "method_options.incoherence"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_incoherent_jobs_run_end_to_end_reproducibly_and_keep_no_grid(
    method: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    weights = []
    for run in ("a", "b", "plain"):
        argv = ["quantize", "--model", str(tiny_llama_dir), "--method", method, "--out", str(tmp_path / run), *SMALL]
        argv += ["--export", "fake_quant"]  # the plain run would be packed by default; compare dense weights
        if run != "plain":
            argv += ["--method-opt", "incoherence=hadamard"]
        assert main(argv) == 0
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["spec"]["method_options"] == ({} if run == "plain" else {"incoherence": "hadamard"})
        model, _ = load_model(str(tmp_path / run / "model"))
        weights.append(model.model.layers[1].mlp.down_proj.weight.detach())
        assert report["perplexity"]["persuasion"]["after"] > 0
    assert torch.equal(weights[0], weights[1])  # same seed, same rotations
    assert not torch.allclose(weights[0], weights[2])
    levels = torch.tensor([g.unique().numel() for g in weights[0].reshape(-1, 32)])
    assert (levels > 8).any()  # a rotation of grid values is not on the 3-bit grid itself


def test_rotating_gptq_leaves_no_grid_on_its_layers(tiny_llama_dir: Path) -> None:
    from quant_core.engine import calibrate_blocks

    model, _ = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    method = build_method("gptq", QuantSpec(bits=3, group_size=32), build_loss("mse"), {"incoherence": "hadamard"})
    calibrate_blocks(model, windows, method, build_loss("mse"))
    assert all(layer_grid(m) is None for m in model.modules())


def test_normtweaking_over_a_rotated_base_is_a_rotated_method() -> None:
    """NormTweaking's weights are its base method's: a rotated base makes it rotate, so the packed export
    is refused and ``auto`` writes the fake-quant model, and the widths are checked up front."""
    options = {"base": "gptq", "base_options": {"incoherence": "hadamard"}}
    method = build_method("normtweaking", QuantSpec(bits=3), build_loss("mse"), options)
    assert method.rotates
    with pytest.raises(ConfigError, match="order 52") as info:
        method.check(nn.ModuleList([nn.Sequential(nn.Linear(52, 64))]))
    assert info.value.field == "method_options.base_options.incoherence"
    with pytest.raises(ConfigError, match="no packed format holds") as info:
        body = {"model": "m", "method": "normtweaking", "method_options": options}
        validated(JobSettings, {**body, "export_formats": ["pack_quantized"]})
    assert info.value.field == "method_options.base_options.incoherence"
    assert not build_method("normtweaking", QuantSpec(bits=3), build_loss("mse"), {}).rotates


def test_normtweaking_over_a_rotated_base_writes_the_fake_quant_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "normtweaking", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--method-opt", "base_options={incoherence: hadamard}"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["exports"]) == ["fake_quant"]
