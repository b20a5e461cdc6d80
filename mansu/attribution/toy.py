"""Tiny random-init models and toy MCQ records for tests and benchmarks (no downloads: models built from configs)."""

from __future__ import annotations

import random
from typing import Any, Literal

from mansu.data.records import MCQRecord

Family = Literal["llama", "qwen2", "gpt2", "mistral", "qwen3", "gemma"]
NAMES = ["Zorb", "Quil", "Marn", "Tesk", "Vory", "Plim", "Drax", "Holt", "Nesk", "Brio", "Cald", "Wemb"]
COLORS = ["red", "blue", "green", "amber", "violet", "grey"]


def toy_records(n: int = 12, seed: int = 0) -> list[MCQRecord]:
    """Cloze MCQ records "The colour of <Name> is ?" with single-word subjects and answers."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        choices = rng.sample(COLORS, 4)
        records.append(MCQRecord(f"Which colour does {name} wear ?", tuple(choices), rng.randrange(4), name))
    return records


def toy_tokenizer() -> Any:
    from mansu.models.demo import build_tokenizer

    return build_tokenizer([" ".join(NAMES + COLORS) + " Which colour does wear ? Answer :"])


def tiny_model(family: Family = "llama", *, vocab_size: int = 64, layers: int = 2, hidden: int = 32, heads: int = 4,
               kv_heads: int | None = None, seed: int = 0) -> Any:
    """A random-init causal LM of the given family, small enough for exhaustive edge patching."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads or heads, intermediate_size=2 * hidden, max_position_embeddings=64)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}: accepted are gpt2, {', '.join(classes)}")
    config_cls, model_cls = classes[family]
    extra = {"head_dim": hidden // heads} if family in ("qwen3", "gemma") else {}
    return model_cls(config_cls(**common, **extra)).eval()
