"""Where a tree's tokens sit in the runner's buffers and KV caches.

vLLM lays a decoding row out as a chain: query token j of the row (0: the
root, the last committed token at position root; j >= 1: draft j - 1) has
position root + j and is written to the cache slot of that position. A tree
keeps that layout for the cache (slots stay distinct), and changes two things:

- before the target forward (``place_nodes_at_depths``): node i is rotated at
  its depth, position root + depth(i), as its tokens' meaning requires; the
  hybrid attention backend applies the ancestor mask;
- after verification (``commit_accepted_paths``): vLLM's scheduler counts the
  request's computed tokens as root + 1 + a for a accepted nodes, i.e. it
  expects the accepted path at positions root + 1 .. root + a, and the draft's
  next first pass re-reads the verified tokens from the runner's ``input_ids``
  and ``positions``. So the path's K/V are copied, in every target layer, from
  query index 1 + node to query index depth (their keys were rotated at
  root + depth already), the path's tokens likewise in ``input_ids``, and the
  positions are set back to the chain's. The row then looks exactly like a
  chain whose first a drafts were accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from vllm_longspec.attention.kv_cache import move_kv_tokens
from vllm_longspec.runner.step import ProposedTree, TargetKVGroups


def place_nodes_at_depths(
    positions: torch.Tensor,  # the runner's [max_num_tokens] int64 positions
    query_start_loc: np.ndarray,  # [num_reqs + 1] this step's
    trees: Mapping[int, ProposedTree],
) -> None:
    for row, tree in trees.items():
        start = int(query_start_loc[row])
        root = positions[start]
        positions[start + 1:start + 1 + tree.num_nodes] = root + tree.depths


def commit_accepted_paths(
    runner,
    target_kv_groups: TargetKVGroups,
    trees: Mapping[int, ProposedTree],
    accepted_paths: Mapping[int, Sequence[int]],
) -> None:
    """``runner``: vLLM's model runner of the step; ``accepted_paths``: tree row ->
    accepted node ids by depth."""
    query_start_loc = runner.query_start_loc.np
    src, dst = [], []  # query token indices in this step's batch
    for row, path in accepted_paths.items():
        start = int(query_start_loc[row])
        for depth, node in enumerate(path, start=1):
            if node + 1 != depth:
                src.append(start + 1 + node)
                dst.append(start + depth)
    for row, tree in trees.items():
        start = int(query_start_loc[row])
        root = runner.positions[start]
        runner.positions[start + 1:start + 1 + tree.num_nodes] = (
            root + torch.arange(1, tree.num_nodes + 1))
    if not src:
        return
    src_index, dst_index = torch.tensor(src), torch.tensor(dst)
    input_ids = runner.input_ids.gpu
    input_ids[dst_index] = input_ids[src_index]
    layers = runner.vllm_config.compilation_config.static_forward_context
    for group_id, layer_names in target_kv_groups:
        slot_mapping = runner.input_batch.block_table[group_id].slot_mapping.gpu
        src_slots, dst_slots = slot_mapping[src_index], slot_mapping[dst_index]
        for name in layer_names:
            layer = layers[name]
            move_kv_tokens(layer.kv_cache, src_slots, dst_slots, layer.isa)
