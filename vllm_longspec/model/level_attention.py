"""The draft's self-attention for the levels of a speculative tree (plain torch).

A round drafts its tree level by level (``vllm_longspec.tree.beam``). A node at
depth d sits at position p = root + d, where root is the position of the
round's root (the last committed token, just written to the draft's window by
the first pass). It must see what a chain token at p would see, restricted to
its own branch:

- the committed tokens of its window, positions [p - window, root], read from
  the draft's KV cache (``DraftWindow``, gathered once per round);
- its ancestors in the tree and itself.

Tree nodes are never written to the draft's KV cache: the next round's first
pass re-feeds the accepted ones at their final positions (as for chains), so
their K/V live here, level after level. Softmax in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_longspec.attention.kv_cache import gather_kv_tokens, split_kv_cache


@dataclass(frozen=True)
class DraftWindow:
    """Each request's last ``window`` committed tokens in the draft's cache."""

    keys: torch.Tensor  # [B, L, num_kv_heads, head_size]
    values: torch.Tensor  # [B, L, num_kv_heads, head_size]
    positions: torch.Tensor  # [B, L] int64; -1 where the request is shorter

    @classmethod
    def gather(
        cls,
        kv_cache: torch.Tensor,  # the draft layer's CPU cache, as vLLM allocated it
        block_table: torch.Tensor,  # [B, max_blocks] int32, the draft group's
        root_positions: torch.Tensor,  # [B] position of each round's root
        window: int,
        cpu_isa: str,
    ) -> DraftWindow:
        """Positions [root - window + 1, root]: all of the cache a node can see."""
        key_half, value_half = split_kv_cache(kv_cache, "cpu")
        block_size = key_half.shape[2]
        offsets = torch.arange(1 - window, 1, device=root_positions.device)
        positions = root_positions.long().unsqueeze(1) + offsets  # [B, L]
        present = positions >= 0
        cached = positions.clamp(min=0)
        slots = (block_table.long().gather(1, cached // block_size) * block_size
                 + cached % block_size)
        keys, values = gather_kv_tokens(key_half, value_half, slots.flatten(), cpu_isa)
        shape = (*positions.shape, *keys.shape[1:])
        return cls(keys.view(shape), values.view(shape),
                   torch.where(present, positions, -1))


class LevelSelfAttention:
    """The draft's self-attention for the levels of one round's trees.

    Per level: ``next_level`` says which nodes each new node sees, then the
    draft's forward calls this object with the level's q/k/v (one row per node,
    request-major) in place of its vLLM attention layer
    (``DraftInputs.level_attention``).
    """

    def __init__(self, window: DraftWindow, root_positions: torch.Tensor,
                 window_size: int, scale: float):
        self.window = window
        self.root_positions = root_positions.long()  # [B]
        self.window_size = window_size
        self.scale = scale
        batch, _, num_kv_heads, head_size = window.keys.shape
        # K/V of the nodes drafted so far: [B, n, num_kv_heads, head_size]
        self.node_keys = window.keys.new_empty(batch, 0, num_kv_heads, head_size)
        self.node_values = window.values.new_empty(batch, 0, num_kv_heads, head_size)
        self._depth = 0
        self._sees_nodes: torch.Tensor | None = None

    def next_level(self, depth: int, sees_nodes: torch.Tensor) -> None:
        """depth: the new level's (1-based); sees_nodes: [B, W, n + W] bool, which
        of the nodes so far and of the level itself each new node sees (its
        ancestors and itself), e.g. rows of ``DraftTree.ancestor_mask``."""
        if sees_nodes.shape[2] != self.node_keys.shape[1] + sees_nodes.shape[1]:
            raise ValueError(
                f"sees_nodes must cover the {self.node_keys.shape[1]} nodes so far and "
                f"the level's own, got shape {tuple(sees_nodes.shape)}")
        self._depth = depth
        self._sees_nodes = sees_nodes

    def __call__(
        self,
        query: torch.Tensor,  # [B * W, num_heads * head_size], RoPE applied
        key: torch.Tensor,  # [B * W, num_kv_heads * head_size], RoPE applied
        value: torch.Tensor,  # [B * W, num_kv_heads * head_size]
    ) -> torch.Tensor:
        """Output [B * W, num_heads * head_size]; stores the level's K/V."""
        if self._sees_nodes is None:
            raise RuntimeError("next_level must be called before each level")
        sees_nodes, self._sees_nodes = self._sees_nodes, None
        batch, width = sees_nodes.shape[:2]
        num_kv_heads, head_size = self.node_keys.shape[2:]
        key = key.view(batch, width, num_kv_heads, head_size)
        value = value.view(batch, width, num_kv_heads, head_size)
        self.node_keys = torch.cat([self.node_keys, key], dim=1)
        self.node_values = torch.cat([self.node_values, value], dim=1)

        # Window keys visible from position p = root + depth: [p - window, root].
        lowest = self.root_positions + self._depth - self.window_size  # [B]
        window_positions = self.window.positions
        sees_window = (window_positions >= 0) & (window_positions >= lowest.unsqueeze(1))
        visible = torch.cat(
            [sees_window.unsqueeze(1).expand(-1, width, -1), sees_nodes], dim=2)

        keys = torch.cat([self.window.keys, self.node_keys], dim=1).float()
        values = torch.cat([self.window.values, self.node_values], dim=1).float()
        group = query.shape[1] // (num_kv_heads * head_size)
        q = query.view(batch, width, num_kv_heads, group, head_size).float()
        scores = torch.einsum("bwhgd,bkhd->bhgwk", q, keys) * self.scale
        scores.masked_fill_(~visible[:, None, None], float("-inf"))
        out = torch.einsum("bhgwk,bkhd->bwhgd", scores.softmax(-1), values)
        return out.reshape(batch * width, -1).to(query.dtype)
