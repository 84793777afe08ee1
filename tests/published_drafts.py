"""Tiny random targets and drafts written exactly as the reference code saves them.

sail-sg/LongSpec saves a draft with ``LlamaGlideDecoderLayer.save_pretrained``
(Qwen2: ``Qwen2GlideDecoderLayer``): ``config.json`` is the target's own config
with that class as its architecture (``num_hidden_layers`` still the target's,
no ``longspec`` section), and the safetensors hold the layer's own parameters,
unprefixed: two attentions (q/k/v with bias, o without), a SwiGLU MLP and three
RMSNorms. These helpers write that layout without ``save_draft``, so the tests
check the loader against the layout itself, not against our own writer.
"""

from __future__ import annotations

import json
from pathlib import Path

# Head size 64: vLLM's CPU attention supports it.
TINY_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
                 max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
GLIDE_CLASS = {"llama": "LlamaGlideDecoderLayer", "qwen2": "Qwen2GlideDecoderLayer"}


def save_tiny_target(directory: Path, family: str, seed: int = 0) -> Path:
    """A random float32 Llama or Qwen2 target, saved by transformers."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**TINY_DIMS)).eval()
    model.save_pretrained(directory)
    return Path(directory)


def glide_layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the reference's ``*GlideDecoderLayer`` and its shape
    (its attention uses head_dim = hidden_size // num_attention_heads)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for attention in ("self_attn", "cross_attn"):
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{attention}.{proj}.weight"] = (out, hidden)
            shapes[f"{attention}.{proj}.bias"] = (out,)
        shapes[f"{attention}.o_proj.weight"] = (hidden, q_out)
    shapes["mlp.gate_proj.weight"] = (ffn, hidden)
    shapes["mlp.up_proj.weight"] = (ffn, hidden)
    shapes["mlp.down_proj.weight"] = (hidden, ffn)
    for norm in ("input_layernorm", "post_self_attention_layernorm",
                 "post_cross_attention_layernorm"):
        shapes[f"{norm}.weight"] = (hidden,)
    return shapes


def write_published_draft(directory: Path, target_dir: Path, seed: int = 0,
                          dtype_name: str = "bfloat16") -> Path:
    """A random draft for ``target_dir`` in the published layout."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(target_dir) / "config.json").read_text())
    family = config["model_type"]
    config["architectures"] = [GLIDE_CLASS[family]]
    config["dtype"] = dtype_name
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in glide_layer_shapes(config).items():
        if name.endswith("layernorm.weight"):
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        tensors[name] = tensor.to(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
