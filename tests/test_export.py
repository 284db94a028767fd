"""The packed export: compressed-tensors ``pack-quantized`` checkpoints that load back bit-faithfully."""

from __future__ import annotations

import json

import compressed_tensors
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant_core.errors import ConfigError
from quant_core.export import export_pack_quantized, vllm_serving_blockers
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.layer_schemes import LayerSchemes
from quant_core.model_structure import find_decoder_blocks, quantizable_linears, stored_layout, weight_matrix
from quant_core.pipeline import export_formats_for
from quant_core.quantizer import QuantSpec, dequantize, grid_codes, group_columns, scale_and_zero, ungroup_columns
from tests.tiny_models import VOCAB, build_model

# Logits of the loaded checkpoint must match the fake-quant model to fp32 round-off, relative to their scale.
LOGIT_RTOL = 1e-5


def fake_quantize_blocks(
    model: torch.nn.Module, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put every linear of the decoder blocks on the grid, returning each layer's ``(scale, zero)``;
    scales rounded to ``scale_dtype`` (a half-precision checkpoint stores them so)."""
    blocks = find_decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    qparams = {}
    with torch.no_grad():
        for index, block in enumerate(blocks):
            for name, layer in quantizable_linears(block).items():
                weight = weight_matrix(layer)
                grouped = group_columns(weight, spec.group_size)
                scale, zero = scale_and_zero(grouped, spec)
                scale = scale.to(scale_dtype).float()
                quantized = dequantize(grid_codes(grouped, scale, zero, spec), scale, zero)
                layer.weight.copy_(stored_layout(layer, ungroup_columns(quantized, weight.shape[1])))
                qparams[f"{prefix}.{index}.{name}"] = (scale.squeeze(-1), zero.squeeze(-1))
    return qparams


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(expected: torch.Tensor, actual: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=LOGIT_RTOL * expected.abs().max().item())


@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "g32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_loaded_checkpoint_reproduces_fake_quant_logits(tmp_path, bits, symmetric, group_size):
    model = build_model("llama")
    spec = QuantSpec(bits, symmetric, group_size)
    qparams = fake_quantize_blocks(model, spec)

    export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)

    assert_same_logits(logits(model), logits(AutoModelForCausalLM.from_pretrained(tmp_path)))


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_model_reloads_with_the_same_logits(tmp_path, bits):
    model = build_model("llama")
    spec = QuantSpec(bits, False, 32)
    qparams = fake_quantize_blocks(model, spec, torch.bfloat16)
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")

    export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path / "packed")

    # Reference: the dense fake-quant checkpoint reloaded (a cast model keeps bf16 rotary tables, a loaded one fp32).
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert loaded.dtype == torch.bfloat16
    assert_same_logits(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), logits(loaded))


@pytest.mark.parametrize("load", [{"device_map": "cpu"}, {"device_map": "auto", "dtype": torch.float32}])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_every_loading_path_reads_the_packed_zero_points(tmp_path, symmetric, load):
    """transformers 5.25 with compressed-tensors 0.20 builds unpacked ``[out, groups]`` zero points on
    the meta device unless the config asks it to ``dequantize``: without that flag an asymmetric
    checkpoint's packed ``[out * bits / 32, groups]`` zero points fail every path with a size
    mismatch. With it, the device-map paths load the same model as the plain one."""
    model = build_model("llama")
    spec = QuantSpec(4, symmetric, 32)
    export_pack_quantized(model, fake_quantize_blocks(model, spec), LayerSchemes(spec), tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **load)

    assert_same_logits(logits(model), logits(loaded.float()))


@pytest.mark.parametrize("arch", ["qwen2", "opt"])
def test_biases_and_tied_embeddings_survive_export(tmp_path, arch):
    model = build_model(arch)
    spec = QuantSpec(4, False, 32)
    qparams = fake_quantize_blocks(model, spec)

    export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)

    assert_same_logits(logits(model), logits(AutoModelForCausalLM.from_pretrained(tmp_path)))


def test_config_declares_pack_quantized_targets_and_library_version(tmp_path):
    model = build_model("llama")
    spec = QuantSpec(3, False, 32)
    export_pack_quantized(model, fake_quantize_blocks(model, spec), LayerSchemes(spec), tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    assert config["version"] == compressed_tensors.__version__
    assert config["dequantize"] is True  # transformers' load path that unpacks asymmetric zero points
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    assert group["weights"] == {
        "num_bits": 3,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
    }


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_layer_tensors_have_the_layout_vllm_reads(tmp_path, symmetric):
    model = build_model("llama")
    spec = QuantSpec(3, symmetric, 32)
    export_pack_quantized(model, fake_quantize_blocks(model, spec), LayerSchemes(spec), tmp_path)

    tensors = load_file(tmp_path / "model.safetensors")
    layer = {key.rsplit(".", 1)[1]: value for key, value in tensors.items() if ".0.self_attn.k_proj." in key}
    out_features, in_features = 32, 64
    assert layer["weight_packed"].dtype == torch.int32
    assert tuple(layer["weight_packed"].shape) == (out_features, in_features * 3 // 32)
    assert layer["weight_shape"].tolist() == [out_features, in_features]
    assert layer["weight_scale"].dtype == torch.float32 and tuple(layer["weight_scale"].shape) == (out_features, 2)
    if symmetric:
        assert "weight_zero_point" not in layer
    else:
        assert layer["weight_zero_point"].dtype == torch.int32
        assert tuple(layer["weight_zero_point"].shape) == (out_features * 3 // 32, 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_weights_take_bits_over_16_of_fp16(tmp_path, bits):
    model = build_model("llama")
    spec = QuantSpec(bits, True, 32)
    qparams = fake_quantize_blocks(model, spec, torch.float16)
    model.half()

    export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)

    tensors = load_file(tmp_path / "model.safetensors")
    packed = sum(v.nbytes for k, v in tensors.items() if k.endswith(".weight_packed"))
    scales = [v for k, v in tensors.items() if k.endswith(".weight_scale")]
    fp16 = sum(model.get_submodule(name).weight.numel() * 2 for name in qparams)
    assert all(scale.dtype == torch.float16 for scale in scales)  # the model's dtype
    assert packed / fp16 == bits / 16
    assert sum(scale.nbytes for scale in scales) / fp16 == 1 / 32  # one fp16 scale per group of 32 weights


def test_ragged_last_group_is_refused(tmp_path):
    model = build_model("llama")
    spec = QuantSpec(4, False, 48)
    qparams = fake_quantize_blocks(model, spec)

    with pytest.raises(ConfigError, match=r"ragged last group in model\.layers\.0\.self_attn\.q_proj") as caught:
        export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)
    assert caught.value.field == "group_size"
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("perturbation", ["between grid points", "beyond the grid's range"])
def test_weight_off_its_grid_is_refused_naming_the_layer(tmp_path, perturbation):
    model = build_model("llama")
    spec = QuantSpec(4, False, 32)
    qparams = fake_quantize_blocks(model, spec)
    layer = model.model.layers[1].mlp.down_proj
    scale, zero = qparams["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        if perturbation == "between grid points":
            layer.weight[3, 5] += 0.3 * scale[3, 0]
        else:
            layer.weight[3, 5] = (spec.qmax + 1 - zero[3, 0]) * scale[3, 0]

    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: the weight is not on the W4A16 g32 asym"):
        export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)


def test_gpt2_conv1d_layers_are_refused(tmp_path):
    model = build_model("gpt2")
    spec = QuantSpec(4, True, 32)
    qparams = fake_quantize_blocks(model, spec)

    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.c_attn is a GPT-2 Conv1D layer"):
        export_pack_quantized(model, qparams, LayerSchemes(spec), tmp_path)


def test_export_copies_the_tokenizer(tmp_path, tokenizer):
    model = build_model("llama")
    spec = QuantSpec(4, True, None)
    export_pack_quantized(model, fake_quantize_blocks(model, spec), LayerSchemes(spec), tmp_path, tokenizer=tokenizer)

    text = "It is a truth universally acknowledged"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize(
    ("spec", "blockers"),
    [
        (QuantSpec(4, True, 128), []),
        (QuantSpec(4, False, None), []),
        (QuantSpec(8, True, 64), []),
        (QuantSpec(3, True, 128), ["3-bit weights"]),
        (QuantSpec(8, False, 128), ["asymmetric 8-bit weights"]),
        (QuantSpec(4, True, 256), ["group size 256"]),
        (QuantSpec(2, False, 48), ["2-bit weights", "group size 48"]),
    ],
    ids=lambda value: value.label if isinstance(value, QuantSpec) else None,
)
def test_vllm_serving_blockers_name_what_marlin_cannot_run(spec, blockers):
    found = vllm_serving_blockers(spec)

    assert [reason.split(":")[0] for reason in found] == blockers


@pytest.mark.parametrize(
    ("options", "group_size", "expected"),
    [
        ({}, 32, ("pack_quantized",)),
        ({"incoherence": "hadamard"}, 32, ("fake_quant",)),  # rotated weights are off the packed grid
        ({}, 48, ("fake_quant",)),  # 64 wide: a ragged last group the format refuses
    ],
    ids=["packable", "rotated", "ragged"],
)
def test_auto_export_packs_wherever_the_format_can_hold_the_result(options, group_size, expected):
    model = build_model("llama")
    spec = JobSpec(model="-", quant=QuantSpec(3, False, group_size), method="gptq", method_options=options)
    assert spec.export_formats == ("auto",)
    assert export_formats_for(spec, spec.build_method(), model, find_decoder_blocks(model)) == expected


def test_explicit_export_is_kept_or_refused_and_auto_goes_alone():
    model = build_model("llama")
    both = JobSpec(
        model="-", quant=QuantSpec(3, False, 32), method="rtn", export_formats=("fake_quant", "pack_quantized")
    )
    assert export_formats_for(both, both.build_method(), model, find_decoder_blocks(model)) == both.export_formats
    ragged = JobSpec(model="-", quant=QuantSpec(3, False, 48), method="rtn", export_formats=("pack_quantized",))
    with pytest.raises(ConfigError, match="ragged last group") as caught:
        export_formats_for(ragged, ragged.build_method(), model, find_decoder_blocks(model))
    assert caught.value.field == "group_size"
    with pytest.raises(ConfigError, match="auto chooses the format itself") as caught:
        validated(JobSettings, {"model": "-", "method": "rtn", "export_formats": ["auto", "fake_quant"]})
    assert caught.value.field == "export_formats"
