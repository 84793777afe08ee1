"""The LongSpec draft block for training: plain torch, the math of model/draft.py.

    h = embed_target(tokens)                                   # given, frozen
    h = h + self_attn(input_layernorm(h))                      # window W, RoPE
    h = h + cross_attn(post_self_attention_layernorm(h))       # target K/V, shift j
    h = h + mlp(post_cross_attention_layernorm(h))             # SwiGLU
    logits = lm_head_target(h)                                 # no final norm

Parameter names (``state_dict()``) are exactly the checkpoint format's
(``vllm_longspec.model.checkpoint.REQUIRED_PARAMS``), so export is a plain
``save_draft(dir, model.state_dict(), ...)`` and a draft directory loads back
with ``load_state_dict``. The residual stream and norms run in float32; under
autocast the projections run in bfloat16.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm_longspec.train.attention import (
    shifted_cross_attention,
    sliding_window_attention,
)
from vllm_longspec.train.rope import (
    apply_rope,
    head_dim_of,
    rope_cos_sin,
    rope_inv_freq,
)


@dataclasses.dataclass(frozen=True)
class DraftDims:
    """Sizes of the draft block: the target's."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float

    @classmethod
    def of_target(cls, target_config: dict[str, Any]) -> DraftDims:
        heads = target_config["num_attention_heads"]
        return cls(
            hidden_size=target_config["hidden_size"],
            num_heads=heads,
            num_kv_heads=target_config.get("num_key_value_heads") or heads,
            head_dim=head_dim_of(target_config),
            intermediate_size=target_config["intermediate_size"],
            rms_norm_eps=target_config["rms_norm_eps"],
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # [batch, seq_len, num_heads * head_dim] -> [batch, num_heads, seq_len, head_dim]
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, num_heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # [batch, num_heads, seq_len, head_dim] -> [batch, seq_len, num_heads * head_dim]
    batch, _, seq_len, _ = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, -1)


class DraftSelfAttention(nn.Module):
    def __init__(self, dims: DraftDims, window: int):
        super().__init__()
        d, q_size, kv_size = (dims.hidden_size, dims.num_heads * dims.head_dim,
                              dims.num_kv_heads * dims.head_dim)
        self.q_proj = nn.Linear(d, q_size, bias=True)
        self.k_proj = nn.Linear(d, kv_size, bias=True)
        self.v_proj = nn.Linear(d, kv_size, bias=True)
        self.o_proj = nn.Linear(q_size, d, bias=False)
        self.num_heads, self.num_kv_heads = dims.num_heads, dims.num_kv_heads
        self.window = window

    def forward(
        self,
        x: torch.Tensor,  # [batch, seq_len, hidden]
        cos: torch.Tensor,  # [batch, seq_len, head_dim]
        sin: torch.Tensor,
    ) -> torch.Tensor:
        q = apply_rope(_split_heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(_split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        attended = sliding_window_attention(q, k, v, self.window)
        return self.o_proj(_merge_heads(attended))


class DraftCrossAttention(nn.Module):
    """Queries only: keys/values are the target's last layer, used as cached."""

    def __init__(self, dims: DraftDims):
        super().__init__()
        q_size = dims.num_heads * dims.head_dim
        self.q_proj = nn.Linear(dims.hidden_size, q_size, bias=True)
        self.o_proj = nn.Linear(q_size, dims.hidden_size, bias=False)
        self.num_heads = dims.num_heads

    def forward(
        self,
        x: torch.Tensor,  # [batch, seq_len, hidden]
        cos: torch.Tensor,  # [batch, seq_len, head_dim]
        sin: torch.Tensor,
        target_keys: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
        target_values: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
        noise_shift: int,
    ) -> torch.Tensor:
        q = apply_rope(_split_heads(self.q_proj(x), self.num_heads), cos, sin)
        attended = shifted_cross_attention(q, target_keys, target_values, noise_shift)
        return self.o_proj(_merge_heads(attended))


class DraftMLP(nn.Module):
    def __init__(self, dims: DraftDims):
        super().__init__()
        d, f = dims.hidden_size, dims.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LongSpecDraft(nn.Module):
    """The draft block; embedding and LM head stay with the (frozen) target."""

    def __init__(self, target_config: dict[str, Any], sliding_window: int):
        super().__init__()
        dims = DraftDims.of_target(target_config)
        self.dims = dims
        self.sliding_window = sliding_window
        eps = dims.rms_norm_eps
        self.input_layernorm = RMSNorm(dims.hidden_size, eps)
        self.self_attn = DraftSelfAttention(dims, sliding_window)
        self.post_self_attention_layernorm = RMSNorm(dims.hidden_size, eps)
        self.cross_attn = DraftCrossAttention(dims)
        self.post_cross_attention_layernorm = RMSNorm(dims.hidden_size, eps)
        self.mlp = DraftMLP(dims)
        inv_freq, self.attention_scaling = rope_inv_freq(target_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        embeddings: torch.Tensor,  # [batch, seq_len, hidden] target's embeddings
        positions: torch.Tensor,  # [batch, seq_len] the target's position ids
        target_keys: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
        target_values: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
        noise_shift: int,
    ) -> torch.Tensor:
        """Final hidden states [batch, seq_len, hidden] (float32), before the LM head."""
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_scaling)
        hidden = embeddings.float()
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        hidden = hidden + self.cross_attn(
            self.post_self_attention_layernorm(hidden), cos, sin,
            target_keys, target_values, noise_shift,
        )
        hidden = hidden + self.mlp(self.post_cross_attention_layernorm(hidden))
        return hidden.float()


def draft_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """Full logits [..., vocab] (tests and evaluation only; training chunks them)."""
    return hidden.to(lm_head_weight.dtype) @ lm_head_weight.T


def load_draft_weights(draft: LongSpecDraft, draft_dir: str | Path) -> torch.Tensor | None:
    """Copy an exported draft directory's block weights into ``draft``.

    Returns the directory's draft vocabulary (token ids) if it has one. Raises
    ``DraftCheckpointError`` if the weights do not fit ``draft`` (another target).
    """
    from safetensors.torch import load_file

    from vllm_longspec.model.checkpoint import (
        DRAFT_VOCAB,
        DraftCheckpointError,
        canonical_name,
        read_draft_checkpoint,
    )

    checkpoint = read_draft_checkpoint(draft_dir)
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint.safetensors_files:
        state.update({canonical_name(k): v for k, v in load_file(str(file)).items()})
    vocab = state.pop(DRAFT_VOCAB, None)
    expected = draft.state_dict()
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise DraftCheckpointError(
                f"{name} in {str(checkpoint.path)!r} has shape {tuple(state[name].shape)}, "
                f"the draft for this target needs {tuple(tensor.shape)}: the draft was "
                "trained for another target."
            )
    draft.load_state_dict({name: state[name].to(t.dtype) for name, t in expected.items()})
    return vocab.long() if vocab is not None else None


def new_draft(
    target_config: dict[str, Any], sliding_window: int, seed: int
) -> LongSpecDraft:
    """A draft with the checkpoint format's initialisation (``random_draft_state``)."""
    from vllm_longspec.model.checkpoint import random_draft_state

    draft = LongSpecDraft(target_config, sliding_window)
    draft.load_state_dict(random_draft_state(target_config, seed=seed))
    return draft
