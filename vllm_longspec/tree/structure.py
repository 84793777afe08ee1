"""Speculative token trees, batched: what a round drafts and the target verifies.

Node view (``DraftTree``): request b drafts nodes 0..N-1 in topological order.
``parents[b, i]`` is in [-1, i), -1 meaning a child of the root: the last
committed token (last round's bonus token), which is not a node. ``depths`` are
1-based, so node i sits at position ``root_position + depths[b, i]``. A chain
is the width-1 tree, ``parents[b, i] == i - 1``.

Slot view: verification needs a distribution at the root too, so per-node
tensors of the target (and draft) are indexed by slot: slot 0 is the root,
slot i + 1 is node i. The target's verification forward runs over exactly these
query tokens, [root, node 0, ..., node N-1]; their parents (``query_parents``)
follow ``vllm_longspec.tree.mask``, the convention of the hybrid tree
attention backend (``TreeStep.ancestor_masks``). ``RaggedTrees`` flattens such query trees
of different sizes for an attention kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_longspec.tree.mask import (
    ancestor_masks,
    pack_ancestor_bits,
    validate_parents,
)


@dataclass(frozen=True)
class DraftTree:
    """B requests' trees of N nodes each, in the node view."""

    tokens: torch.Tensor   # [B, N] int64 drafted token ids
    parents: torch.Tensor  # [B, N] int64 parent node, -1 = the root
    depths: torch.Tensor   # [B, N] int64, 1 for the root's children

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor) -> DraftTree:
        """Checks that ``parents`` are topologically ordered and derives the depths."""
        if tokens.dim() != 2 or tokens.shape != parents.shape or tokens.shape[1] == 0:
            raise ValueError(f"tokens and parents must both be [B, N] with N >= 1, got "
                             f"{tuple(tokens.shape)} and {tuple(parents.shape)}")
        nodes = torch.arange(parents.shape[1], device=parents.device)
        if not ((parents >= -1) & (parents < nodes)).all():
            raise ValueError("parents must be topologically ordered: "
                             "-1 <= parents[b, i] < i")
        parents = parents.long()
        return cls(tokens.long(), parents, ancestor_masks(parents).sum(-1))

    @classmethod
    def chain(cls, tokens: torch.Tensor) -> DraftTree:
        """[B, K] tokens drafted one after the other (K >= 1)."""
        batch, length = tokens.shape
        nodes = torch.arange(length, device=tokens.device).expand(batch, length)
        return cls(tokens.long(), nodes - 1, nodes + 1)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """[B, N, N] bool: (b, i, j) True iff node j is node i or one of its ancestors."""
        return ancestor_masks(self.parents)

    @cached_property
    def children(self) -> torch.Tensor:
        """[B, N + 1, C] children of each slot (0: root, i + 1: node i) in node
        order, -1 padded; C is the largest number of children in the batch."""
        parent_slot = self.parents + 1
        # [B, N, N + 1]: node i is a child of slot s
        is_child = torch.nn.functional.one_hot(parent_slot, self.num_nodes + 1)
        sibling_rank = (is_child.cumsum(1) * is_child).sum(-1) - 1  # [B, N]
        width = int(is_child.sum(1).max())
        table = self.parents.new_full((self.batch_size, self.num_nodes + 1, width), -1)
        rows = torch.arange(self.batch_size, device=self.parents.device).unsqueeze(1)
        nodes = torch.arange(self.num_nodes, device=self.parents.device)
        table[rows, parent_slot, sibling_rank] = nodes.expand_as(parent_slot)
        return table

    def positions(self, root_positions: torch.Tensor) -> torch.Tensor:
        """[B] root positions -> [B, N] node positions."""
        return root_positions.unsqueeze(1) + self.depths

    def query_parents(self) -> list[list[int]]:
        """Per request, the parents of its verification query tokens [root, nodes...]
        (``tree.mask`` convention)."""
        return [[-1] + row for row in (self.parents + 1).tolist()]

    def to_ragged(self) -> RaggedTrees:
        return RaggedTrees.from_query_parents(self.query_parents())


@dataclass(frozen=True)
class RaggedTrees:
    """Query trees of different sizes, flattened: request r owns query rows
    ``query_start_loc[r]:query_start_loc[r + 1]``, its root first."""

    parents: torch.Tensor          # [T] int64 request-local parent, -1 for each root
    depths: torch.Tensor           # [T] int64, 0 for each root
    query_start_loc: torch.Tensor  # [R + 1] int32

    @classmethod
    def from_query_parents(cls, parents_per_request: Sequence[Sequence[int]]) -> RaggedTrees:
        for parents in parents_per_request:
            validate_parents(parents)
        lengths = torch.tensor([0] + [len(p) for p in parents_per_request])
        flat = [parent for parents in parents_per_request for parent in parents]
        depths = [ancestor_masks(torch.tensor(p)).sum(-1) - 1 for p in parents_per_request]
        return cls(
            parents=torch.tensor(flat, dtype=torch.int64),
            depths=torch.cat(depths) if depths else torch.zeros(0, dtype=torch.int64),
            query_start_loc=lengths.cumsum(0).to(torch.int32),
        )

    @property
    def num_requests(self) -> int:
        return self.query_start_loc.shape[0] - 1

    def request_parents(self, request: int) -> torch.Tensor:
        start, end = self.query_start_loc[request:request + 2].tolist()
        return self.parents[start:end]

    def ancestor_bits(self) -> torch.Tensor:
        """[T, MAX_SPEC_TOKENS // 32] int32 packed masks, the kernels' ``ancestor_bits``."""
        return pack_ancestor_bits([ancestor_masks(self.request_parents(r))
                                   for r in range(self.num_requests)])
