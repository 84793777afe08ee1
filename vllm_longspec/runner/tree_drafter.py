"""Drafting one round's dynamic beam trees with the LongSpec draft.

The round starts where a chain round starts: vLLM's first pass has re-fed the
verified tokens and the root (the bonus token) to the draft, whose hidden state
at the root gives the root's logits. From there, one draft forward per level
(``BeamTreeBuilder``): the level's nodes run the whole draft block at positions
root + depth, their self-attention over the window and their ancestors
(``TreeSelfAttention``), their cross-attention over the committed target prefix
(the same for every node of the round, as for chains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vllm_longspec.model.draft import CrossAttentionInputs, LongSpecForCausalLM
from vllm_longspec.model.tree_attention import DraftWindow, TreeSelfAttention
from vllm_longspec.tree import BatchSampling, BeamTree, BeamTreeBuilder


class TreeDrafter:
    """The LongSpec draft growing a batch's beam trees, level by level."""

    def __init__(self, model: LongSpecForCausalLM, widths: Sequence[int],
                 window_layer):
        self.model = model
        self.widths = tuple(widths)
        # the draft's vLLM attention layer: its KV cache holds the window
        self.window_layer = window_layer

    def draft(
        self,
        root_logits: torch.Tensor,  # [B, V] the draft's logits at each root
        cross_attention: CrossAttentionInputs,  # the round's committed prefix
        window_block_table: torch.Tensor,  # [B, max_blocks] the draft group's
        sampling: BatchSampling,
    ) -> BeamTree:
        builder = BeamTreeBuilder(self.widths, sampling)
        level = builder.expand(root_logits.unsqueeze(1))
        if builder.done:
            return builder.build()
        # The root sits at the first position not yet in the target cache.
        root_positions = cross_attention.committed_lens.long()
        window_size = self.model.sliding_window
        window = DraftWindow.gather(self.window_layer.kv_cache, window_block_table,
                                    root_positions, window_size, self.window_layer.isa)
        attention = TreeSelfAttention(window, root_positions, window_size,
                                      self.model.self_attn.scale)
        batch = root_logits.shape[0]
        depth = 1
        while not builder.done:
            width = level.tokens.shape[1]
            attention.next_level(depth, builder.build().tree.ancestor_mask[:, -width:])
            positions = root_positions.repeat_interleave(width) + depth  # [B * W]
            rows = torch.arange(batch * width + 1, device=root_logits.device)
            self.model.tree_attention = attention
            # every node runs the whole block; request b's nodes are rows b * width...
            self.model.cross_attention_inputs = dataclasses.replace(
                cross_attention, rows=rows[:-1], query_start_loc=rows[::width].int())
            try:
                hidden = self.model(input_ids=level.tokens.flatten(), positions=positions)
            finally:
                self.model.tree_attention = None
                self.model.cross_attention_inputs = None
            level = builder.expand(self.model.compute_logits(hidden).view(batch, width, -1))
            depth += 1
        return builder.build()
