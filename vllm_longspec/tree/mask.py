"""Speculative token trees as ancestor masks, and their packed bit form.

A request's new tokens in one target forward are the root (the last committed
token, query position 0) followed by its draft tokens in topological order,
described by ``parents``: ``parents[0] == -1`` and ``0 <= parents[i] < i``.
A chain is ``parents[i] == i - 1`` (the causal default).

Token i sees token j iff j is i or an ancestor of i: ``ancestor_mask``, or
batched from a tensor, ``ancestor_masks`` (also used for masks over draft
nodes only, ``DraftTree.ancestor_mask``). Kernels take that mask as ``ancestor_bits``
[num_tokens, words] int32 (bit ``j % 32`` of word ``j // 32``), at most
``MAX_SPEC_TOKENS`` tokens per request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_longspec.tree.limits import BITS_WORDS, MAX_SPEC_TOKENS


def chain_parents(num_tokens: int) -> list[int]:
    return list(range(-1, num_tokens - 1))


def validate_parents(parents: Sequence[int]) -> None:
    if not 1 <= len(parents) <= MAX_SPEC_TOKENS:
        raise ValueError(
            f"a speculative tree has 1..{MAX_SPEC_TOKENS} tokens, got {len(parents)}")
    if parents[0] != -1:
        raise ValueError(f"parents[0] must be -1 (the root), got {parents[0]}")
    for i, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < i:
            raise ValueError(
                f"parents must be topologically ordered (0 <= parents[i] < i); "
                f"parents[{i}] = {parent}")


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True iff token i sees token j."""
    validate_parents(parents)
    return ancestor_masks(torch.tensor(parents))


def ancestor_masks(parents: torch.Tensor) -> torch.Tensor:
    """[..., n] int parents (-1: none) -> [..., n, n] bool, (i, j) True iff j is i
    or an ancestor of i. Batched, on the parents' device, without host syncs.

    The "itself or its parent" relation squared ceil(log2 n) times: after k
    squarings it reaches 2**k generations up, and no chain is longer than n - 1.
    """
    n = parents.shape[-1]
    nodes = torch.arange(n, device=parents.device)
    reach = ((parents.unsqueeze(-1) == nodes) | (nodes.unsqueeze(-1) == nodes)).float()
    for _ in range((n - 1).bit_length()):
        reach = (reach @ reach).clamp_(max=1)
    return reach.bool()


def pack_ancestor_bits(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-request [n_r, n_r] bool masks -> [sum n_r, BITS_WORDS] int32."""
    rows = []
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    for mask in masks:
        n = mask.shape[0]
        if n > MAX_SPEC_TOKENS or mask.shape != (n, n):
            raise ValueError(f"masks must be square with at most {MAX_SPEC_TOKENS} "
                             f"tokens, got {tuple(mask.shape)}")
        padded = torch.zeros(n, MAX_SPEC_TOKENS, dtype=torch.int64)
        padded[:, :n] = mask.to(torch.int64)
        words = (padded.view(n, BITS_WORDS, 32) * weights).sum(-1)
        rows.append(torch.where(words >= 1 << 31, words - (1 << 32), words))
    if not rows:
        return torch.zeros(0, BITS_WORDS, dtype=torch.int32)
    return torch.cat(rows).to(torch.int32)


def unpack_ancestor_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """[n, words] int32 -> [n, n] bool (the inverse of one request's packing)."""
    j = torch.arange(n, device=bits.device)
    words = bits[:, j // 32].long() & 0xFFFFFFFF
    return ((words >> (j % 32)) & 1).bool()
