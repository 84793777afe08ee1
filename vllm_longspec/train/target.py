"""The frozen target: load it, and run it for what the draft trains on.

From one target forward over a batch at given position ids we take:

    embeddings     [batch, T, hidden]             embed_tokens(input_ids)
    last_keys      [batch, num_kv_heads, T, D]    last decoder layer, AFTER RoPE
    last_keys_unrotated  [batch, num_kv_heads, T, D]   the same, BEFORE RoPE
    last_values    [batch, num_kv_heads, T, D]
    final_hidden   [batch, T, hidden]             after the final norm (distillation)

The last-layer K/V come from the transformers ``DynamicCache`` filled by the
forward: it stores keys exactly as the attention uses them (rotated at the
given positions). The unrotated keys are the last layer's ``k_proj`` applied
to its normed input (the forward's recorded hidden states): what the feature
cache stores, because only they can be rotated to other positions. The
target's LM head is not run here (no [B, T, vocab] logits); distillation
applies it chunk-wise in ``loss.py``, or ``teacher_top_k`` keeps its k largest
logits.

Two transformers behaviours matter for AOI and are handled here:
- position ids with a jump (the AOI offset) look like packed sequences to
  transformers' mask builder when there is no attention mask and no cache
  (e.g. ``use_cache=False``): it would cut attention at the jump. We always
  pass an all-ones attention mask and a cache, which turns that off.
- tensors made under ``torch.inference_mode`` cannot be saved for backward, and
  the draft's first op saves its input, so the target runs under ``no_grad``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

SUPPORTED_TARGET_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class UnsupportedTargetError(ValueError):
    """The target model cannot carry a LongSpec draft."""


@dataclasses.dataclass
class TargetOutputs:
    embeddings: torch.Tensor  # [batch, T, hidden]
    last_keys: torch.Tensor  # [batch, num_kv_heads, T, head_dim], rotated
    last_keys_unrotated: torch.Tensor  # [batch, num_kv_heads, T, head_dim]
    last_values: torch.Tensor  # [batch, num_kv_heads, T, head_dim]
    final_hidden: torch.Tensor | None  # [batch, T, hidden] or None


def read_target_config(path: str | Path) -> dict[str, Any]:
    """The target's config.json as a dict."""
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError:
        raise UnsupportedTargetError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json). "
            "Run `python -m vllm_longspec.assets` for the default target, or set "
            "'target' in the training config."
        ) from None


def check_target_config(target_config: dict[str, Any]) -> None:
    """Raise UnsupportedTargetError unless the target is a plain Llama / Qwen2."""
    archs = list(target_config.get("architectures") or [])
    if not set(archs) & set(SUPPORTED_TARGET_ARCHITECTURES):
        raise UnsupportedTargetError(
            f"LongSpec drafts can be trained for {', '.join(SUPPORTED_TARGET_ARCHITECTURES)}"
            f" targets; this target is {archs or 'of unknown architecture'}."
        )
    if target_config.get("use_sliding_window"):
        raise UnsupportedTargetError(
            "The target uses sliding-window attention in its layers; LongSpec needs "
            "the full last-layer KV cache. Use a target with use_sliding_window=false."
        )


def load_target(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """The target as a frozen HF causal LM in ``dtype``, eval mode."""
    from transformers import AutoModelForCausalLM

    check_target_config(read_target_config(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def lm_head_weight(target) -> torch.Tensor:
    """[vocab, hidden] the target's LM head (tied to the embedding for SmolLM2)."""
    return target.get_output_embeddings().weight


@torch.no_grad()
def run_target(
    target,
    input_ids: torch.Tensor,  # [batch, T]
    position_ids: torch.Tensor,  # [batch, T]
    need_final_hidden: bool = False,
) -> TargetOutputs:
    from transformers import DynamicCache

    embeddings = target.get_input_embeddings()(input_ids)
    cache = DynamicCache(config=target.config)
    outputs = target.model(
        inputs_embeds=embeddings,
        position_ids=position_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
    )
    last_layer = outputs.past_key_values.layers[-1]
    # hidden_states: (embeddings, output of layer 1, .., of layer L-1, final normed)
    # [batch, T, hidden]: the last decoder layer's input
    last_input = outputs.hidden_states[-2]
    decoder = target.model.layers[-1]
    keys = decoder.self_attn.k_proj(decoder.input_layernorm(last_input))
    batch, seq_len = input_ids.shape
    # [batch, num_kv_heads, T, head_dim]
    keys = keys.view(batch, seq_len, -1, last_layer.keys.shape[-1]).transpose(1, 2)
    return TargetOutputs(
        embeddings=embeddings,
        last_keys=last_layer.keys,
        last_keys_unrotated=keys,
        last_values=last_layer.values,
        final_hidden=outputs.last_hidden_state if need_final_hidden else None,
    )


@torch.no_grad()
def teacher_top_k(
    final_hidden: torch.Tensor,  # [batch, T, hidden]
    lm_head: torch.Tensor,  # [vocab, hidden]
    k: int,
    chunk_rows: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's k largest logits per position, largest first, in the head's
    dtype, and their token ids: ([batch, T, k], [batch, T, k] int64)."""
    batch, seq_len, hidden = final_hidden.shape
    flat = final_hidden.reshape(-1, hidden)
    values, ids = [], []
    for start in range(0, flat.shape[0], chunk_rows):
        # [chunk, vocab], computed as the loss computes the target's logits
        logits = flat[start:start + chunk_rows].to(lm_head.dtype) @ lm_head.T
        top = torch.topk(logits, k, dim=-1, sorted=True)
        values.append(top.values)
        ids.append(top.indices)
    return (torch.cat(values).view(batch, seq_len, k),
            torch.cat(ids).view(batch, seq_len, k))
