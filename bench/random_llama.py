"""A seeded random Llama of any size and a BPE tokenizer trained on the bundled corpus, saved as a user
would point a job at it: for benchmarks of the service (tiny) and of time and memory at scale on a GPU
(no real model of that size can be fetched where they run)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_VOCAB = 320  # the BPE's own tokens; a model may have more embedding rows than it uses


def save_random_llama(
    path: Path,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = TOKENIZER_VOCAB,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write the model and its tokenizer to ``path``; return ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quant_core.corpus import BUNDLED_TEXTS

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=special, show_progress=False)
    bpe.train_from_iterator(BUNDLED_TEXTS["austen"].read_text(encoding="utf-8")[:200_000].splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab, TOKENIZER_VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        dtype=dtype,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    return path
