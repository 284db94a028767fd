"""Tiny decoder models and a tokenizer built in code, so tests need no download."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from quant_core.corpus import BUNDLED_TEXTS

VOCAB = 320


def build_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A small BPE trained on the bundled corpus: real words, real token statistics, no file needed.

    ``adds_bos``: it puts ``<s>`` in front of every text it encodes, as Llama's and Gemma's do.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = BUNDLED_TEXTS["austen"].read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(_LLAMA_LIKE, max_position_embeddings=256), "num_hidden_layers"),
    # 64-wide heads and widths in multiples of 32: what vLLM's CPU attention and int4 kernel take
    "llama_wide": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        "num_hidden_layers",
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(_LLAMA_LIKE, max_position_embeddings=256), "num_hidden_layers"),
    "opt": (
        OPTConfig,
        OPTForCausalLM,
        dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
        "num_hidden_layers",
    ),
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(n_embd=64, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
        "n_layer",
    ),
}
# The families users bring, each with what sets it apart (tests/test_families.py): Llama 3's rope scaling
# and untied head, Mistral's sliding window, Qwen3's q/k norms, Gemma's 1 + w norms, scaled embeddings,
# sliding layers and soft-capping (Gemma 2: logits and attention), Phi-3's fused qkv and gate_up.
_GEMMA = dict(_LLAMA_LIKE, head_dim=16, max_position_embeddings=256, sliding_window=16, query_pre_attn_scalar=16)
FAMILIES = {
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            _LLAMA_LIKE,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "num_hidden_layers",
    ),
    "mistral": (MistralConfig, MistralForCausalLM, dict(_LLAMA_LIKE, sliding_window=16), "num_hidden_layers"),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(_LLAMA_LIKE, head_dim=16, tie_word_embeddings=True),
        "num_hidden_layers",
    ),
    # a cap that bends a tiny random model's small logits (Gemma 2's own is 30)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(_GEMMA, final_logit_softcapping=0.05), "num_hidden_layers"),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, _GEMMA, "num_hidden_layers"),
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        dict(_LLAMA_LIKE, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "num_hidden_layers",
    ),
}
# Mixtures of experts (quant_core/experts.py): Mixtral (8 experts, top 2), Qwen2-MoE (a gated shared
# expert beside the routed ones, top-k weights not renormalised), Qwen3-MoE (q/k norms; its first
# layer a dense MLP, as ``mlp_only_layers`` allows).
_MOE = dict(_LLAMA_LIKE, max_position_embeddings=256)
MOE_FAMILIES = {
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(_MOE, num_local_experts=8, num_experts_per_tok=2),
        "num_hidden_layers",
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            _MOE,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "num_hidden_layers",
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(_MOE, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0]),
        "num_hidden_layers",
    ),
}
FAMILIES.update(MOE_FAMILIES)
ARCHITECTURES.update(FAMILIES)


def build_model(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A seeded random model of the given architecture, hidden 64, in fp32."""
    config_cls, model_cls, sizes, layers_key = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=VOCAB, **sizes, **{layers_key: layers})).eval()
