"""Drafting one round's dynamic beam trees with the LongSpec draft.

The round starts where a chain round starts: vLLM's first pass has re-fed the
verified tokens and the root (the bonus token) to the draft, whose hidden state
at the root gives the root's logits. From there, one draft forward per level
(``BeamTreeBuilder``): the level's nodes run the whole draft block at positions
root + depth, their self-attention over the window and their ancestors
(``LevelSelfAttention``), their cross-attention over the committed target prefix
(the same for every node of the round, as for chains). Each level's forward
gets its inputs as one ``DraftInputs`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_longspec.model.draft import LongSpecForCausalLM
from vllm_longspec.model.draft_inputs import CrossAttentionInputs, DraftInputs
from vllm_longspec.model.level_attention import DraftWindow, LevelSelfAttention
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
        root_logits: torch.Tensor,  # [B, N] the draft's logits at each root (draft_logits)
        cross_attention: CrossAttentionInputs,  # the round's committed prefix
        window_block_table: torch.Tensor,  # [B, max_blocks] the draft group's
        sampling: BatchSampling,
    ) -> BeamTree:
        builder = BeamTreeBuilder(self.widths, sampling, self.model.vocabulary)
        level = builder.expand(root_logits.unsqueeze(1))
        if builder.done:
            return builder.build()
        # The root sits at the first position not yet in the target cache.
        root_positions = cross_attention.committed_lens.long()
        window_size = self.model.sliding_window
        window = DraftWindow.gather(self.window_layer.kv_cache, window_block_table,
                                    root_positions, window_size, self.window_layer.isa)
        attention = LevelSelfAttention(window, root_positions, window_size,
                                       self.model.self_attn.scale)
        batch = root_logits.shape[0]
        depth = 1
        while not builder.done:
            width = level.tokens.shape[1]
            attention.next_level(depth, builder.tree().ancestor_mask[:, -width:])
            positions = root_positions.repeat_interleave(width) + depth  # [B * W]
            rows = torch.arange(batch * width + 1, device=root_logits.device)
            # every node runs the whole block; request b's nodes are rows b * width...
            inputs = DraftInputs(cross_attention, rows=rows[:-1],
                                 query_start_loc=rows[::width].int(),
                                 level_attention=attention)
            hidden = self.model(input_ids=level.tokens.flatten(), positions=positions,
                                draft_inputs=inputs)
            level = builder.expand(self.model.draft_logits(hidden).view(batch, width, -1))
            depth += 1
        return builder.build()
