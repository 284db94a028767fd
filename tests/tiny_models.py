"""Tiny decoder models and a tokenizer built in code, so tests need no download."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
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


def build_model(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A seeded random model of the given architecture, hidden 64, in fp32."""
    config_cls, model_cls, sizes, layers_key = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=VOCAB, **sizes, **{layers_key: layers})).eval()
