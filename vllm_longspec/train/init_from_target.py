"""Start the draft block from one of the target's decoder layers (``init_from_target_layer``).

The draft block is a decoder layer with a cross-attention between its
self-attention and its MLP, and its sizes are the target's, so a target layer
fills almost all of it:

    draft                                   target layer L
    input_layernorm                    <-   input_layernorm
    self_attn.{q,k,v,o}_proj           <-   self_attn.{q,k,v,o}_proj
    post_self_attention_layernorm      <-   input_layernorm      (normed input of q_proj)
    cross_attn.q_proj, cross_attn.o_proj <- self_attn.q_proj, self_attn.o_proj
    post_cross_attention_layernorm     <-   post_attention_layernorm
    mlp.{gate,up,down}_proj            <-   mlp.{gate,up,down}_proj

The cross-attention reads the target's LAST layer's cached K/V; with L = that
layer its query projection is the one those keys were trained against, so the
draft starts out asking the target's cache the target's own questions. Biases
the target has (Qwen2's q/k/v) are copied; where it has none (Llama) the
draft's are zero. The draft keeps no final norm: its hidden state goes to the
LM head as is (model.py), and training adapts to that.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_longspec.train.model import LongSpecDraft

# draft linear -> target layer linear (names under the layer)
LINEAR_SOURCES = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "cross_attn.q_proj": "self_attn.q_proj",
    "cross_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
# draft norm -> target layer norm
NORM_SOURCES = {
    "input_layernorm": "input_layernorm",
    "post_self_attention_layernorm": "input_layernorm",
    "post_cross_attention_layernorm": "post_attention_layernorm",
}


def resolve_layer_index(index: int, num_layers: int) -> int:
    """``index`` as a non-negative layer number (Python-style negatives allowed)."""
    if not -num_layers <= index < num_layers:
        raise ValueError(
            f"init_from_target_layer {index} is out of range: the target has "
            f"{num_layers} decoder layers, so use -{num_layers}..{num_layers - 1} "
            "(-1: the last layer, whose K/V the cross-attention reads)."
        )
    return index % num_layers


def target_layer_state(target: nn.Module, layer_index: int,
                       draft: LongSpecDraft) -> dict[str, torch.Tensor]:
    """The draft's ``state_dict`` filled from ``target.model.layers[layer_index]``
    (see the module docstring), in the draft's dtypes."""
    layers = target.model.layers
    layer = layers[resolve_layer_index(layer_index, len(layers))]
    source = dict(layer.named_parameters())
    state = {name: tensor.clone() for name, tensor in draft.state_dict().items()}
    for draft_name, target_name in LINEAR_SOURCES.items():
        weight = source[f"{target_name}.weight"]
        state[f"{draft_name}.weight"] = weight.detach().to(state[f"{draft_name}.weight"].dtype)
        if f"{draft_name}.bias" in state:
            bias = source.get(f"{target_name}.bias")
            state[f"{draft_name}.bias"] = (
                torch.zeros_like(state[f"{draft_name}.bias"]) if bias is None
                else bias.detach().to(state[f"{draft_name}.bias"].dtype))
    for draft_name, target_name in NORM_SOURCES.items():
        weight = source[f"{target_name}.weight"]
        state[f"{draft_name}.weight"] = weight.detach().to(state[f"{draft_name}.weight"].dtype)
    return state


def init_from_target_layer(draft: LongSpecDraft, target: nn.Module, layer_index: int) -> None:
    """Copy a target decoder layer into ``draft`` (in place)."""
    draft.load_state_dict(target_layer_state(target, layer_index, draft))
