"""Tree rows in the runner's buffers and caches: nodes at their depth, accepted
paths moved to the chain layout (against a stand-in runner and a CPU cache
written by vLLM)."""

from __future__ import annotations

import types

import numpy as np
import torch

from vllm_longspec.attention.kv_cache import gather_kv_tokens, split_kv_cache
from vllm_longspec.runner.layout import (
    commit_accepted_paths,
    place_nodes_at_depths,
)
from vllm_longspec.runner.step import ProposedTree

BLOCK, HEADS, HEAD = 32, 2, 64


def _tree(parents: list[int]) -> ProposedTree:
    depths = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    n = len(parents)
    return ProposedTree(torch.arange(n), torch.tensor(parents), torch.tensor(depths), None)


def _runner(positions, input_ids, query_start_loc, slots):
    """What commit_accepted_paths reads: one KV group (id 3) of two layers."""
    from vllm import _custom_ops as ops

    layers = {}
    for name in ("layers.0.attn", "layers.1.attn"):
        kv_cache = torch.zeros(8, HEADS, BLOCK, 2 * HEAD)
        key_half, value_half = split_kv_cache(kv_cache, "cpu")
        # token at batch index t has keys t + layer and values -t (recognisable)
        tokens = torch.arange(len(slots), dtype=torch.float32)
        keys = (tokens + len(layers))[:, None, None].expand(-1, HEADS, HEAD).contiguous()
        values = (-tokens)[:, None, None].expand(-1, HEADS, HEAD).contiguous()
        ops.cpu_attn_reshape_and_cache(keys, values, key_half, value_half, slots, "vec")
        layers[name] = types.SimpleNamespace(kv_cache=kv_cache, isa="vec")
    table = types.SimpleNamespace(slot_mapping=types.SimpleNamespace(gpu=slots))
    return types.SimpleNamespace(
        positions=positions, input_ids=types.SimpleNamespace(gpu=input_ids),
        query_start_loc=types.SimpleNamespace(np=query_start_loc),
        input_batch=types.SimpleNamespace(block_table={3: table}),
        vllm_config=types.SimpleNamespace(compilation_config=types.SimpleNamespace(
            static_forward_context=layers)))


def test_nodes_at_depths_then_accepted_path_in_chain_layout():
    # Batch: row 0 a prompt chunk of 3 tokens; row 1 a tree row, root at
    # position 40, nodes [-1, -1, 0, 1, 3] (depths 1, 1, 2, 2, 3).
    tree = _tree([-1, -1, 0, 1, 3])
    query_start_loc = np.array([0, 3, 9])
    positions = torch.tensor([7, 8, 9, 40, 41, 42, 43, 44, 45])
    place_nodes_at_depths(positions, query_start_loc, {1: tree})
    assert positions.tolist() == [7, 8, 9, 40, 41, 41, 42, 42, 43]

    input_ids = torch.tensor([100, 101, 102, 200, 201, 202, 203, 204, 205])
    slots = torch.tensor([5, 6, 7, 70, 71, 72, 73, 74, 75])  # distinct chain slots
    runner = _runner(positions, input_ids, query_start_loc, slots)
    # accepted: node 1 (depth 1), node 3 (depth 2), node 4 (depth 3)
    commit_accepted_paths(runner, [(3, ["layers.0.attn", "layers.1.attn"])], {1: tree},
                          {1: [1, 3, 4]})

    assert positions.tolist() == [7, 8, 9, 40, 41, 42, 43, 44, 45]
    # query indices 1..3 of row 1 now hold the path's tokens (nodes 1, 3, 4)
    assert input_ids.tolist() == [100, 101, 102, 200, 202, 204, 205, 204, 205]
    for offset, (name, layer) in enumerate(runner.vllm_config.compilation_config
                                           .static_forward_context.items()):
        keys, values = gather_kv_tokens(*split_kv_cache(layer.kv_cache, "cpu"), slots, "vec")
        # whose K/V row 1's query slots hold now: the root, then nodes 1, 3, 4
        # (node i was written at batch index 3 + 1 + i)
        holder = [3, 5, 7, 8]
        for query_index, source in enumerate(holder):
            t = 3 + query_index
            assert torch.all(keys[t] == source + offset), name
            assert torch.all(values[t] == -source), name
        assert torch.all(keys[:3] == torch.arange(3.0)[:, None, None] + offset)
