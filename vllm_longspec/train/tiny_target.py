"""A tiny random Llama target, for tests and smoke runs of the trainer.

hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), vocab 256,
max_position_embeddings 2048, float32, seeded. Saved as a normal HF directory
(no tokenizer: train it on a "tokens" source).
"""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
    max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def save_tiny_llama(directory: str | Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory
