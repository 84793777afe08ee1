"""The target's rotary position embedding (neox style, as HF Llama's rotate_half).

The draft rotates its self-attention q/k and its cross-attention q with the
TARGET's tables (same base, same scaling), exactly like vLLM's ``get_rope`` on
the serving side. "default" RoPE is computed here; scaled types (linear, llama3,
yarn, ...) take their inverse frequencies from transformers. Types whose tables
change with the sequence length (dynamic NTK, longrope) are rejected.
"""

from __future__ import annotations

from typing import Any

import torch

LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def rope_parameters(target_config: dict[str, Any]) -> dict[str, Any]:
    """The target's RoPE settings (transformers 5 ``rope_parameters`` or older keys)."""
    params = target_config.get("rope_parameters")
    if params:
        return dict(params)
    scaling = dict(target_config.get("rope_scaling") or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", target_config.get("rope_theta", 10000.0))
    return scaling


def head_dim_of(target_config: dict[str, Any]) -> int:
    return target_config.get("head_dim") or (
        target_config["hidden_size"] // target_config["num_attention_heads"]
    )


def rope_inv_freq(target_config: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention_scaling) of the target's RoPE."""
    params = rope_parameters(target_config)
    rope_type = params.get("rope_type", "default")
    head_dim = head_dim_of(target_config)
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        raise ValueError(
            f"The target's RoPE type {rope_type!r} changes with the sequence length; "
            "LongSpec training supports static RoPE types (default, linear, llama3, "
            "yarn, ...)."
        )
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.for_model(**target_config)
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    return inv_freq.float(), float(attention_scaling)


def rope_cos_sin(
    positions: torch.Tensor,  # [batch, seq_len] int
    inv_freq: torch.Tensor,  # [head_dim / 2]
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [batch, seq_len, head_dim] in float32."""
    # [batch, seq_len, head_dim / 2]
    freqs = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rope(
    x: torch.Tensor,  # [batch, heads, seq_len, head_dim]
    cos: torch.Tensor,  # [batch, seq_len, head_dim]
    sin: torch.Tensor,
) -> torch.Tensor:
    """x rotated (in float32), returned in x's dtype."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    out = x32 * cos[:, None] + rotated_half * sin[:, None]
    return out.to(x.dtype)
