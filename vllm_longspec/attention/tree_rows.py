"""The rows of a batch that hybrid attention verifies, as a compact sub-batch.

Shared by the CPU and GPU hybrid backends. Once per step,
``patches/attention_metadata.py`` decides which rows of the target's forward
are verified with hybrid attention (``rows_to_verify``: the step's tree rows,
with their ancestor masks) and hands them to each target layer's metadata
builder, which plans them (``TreeRows.build``: token indices,
query_start_loc, committed prefix lengths and packed ancestor masks, on the
device of the batch) and adds each KV-cache group's block-table rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from vllm_longspec.tree.limits import MAX_SPEC_TOKENS
from vllm_longspec.tree.mask import ancestor_mask, chain_parents, pack_ancestor_bits


def rows_to_verify(
    tree_masks: Mapping[int, torch.Tensor],  # row -> [q, q] bool ancestor mask
    query_lens: Sequence[int],
    chains: bool,
) -> dict[int, torch.Tensor]:
    """Row -> [q, q] mask of every row to verify with hybrid attention: the tree
    rows, and with ``chains`` every other row of 2..MAX_SPEC_TOKENS tokens as a
    chain (causal). A tree must cover all of its row's query tokens; a larger
    one is cut to them (a prefix of a level-ordered tree is a tree)."""
    rows = {}
    for row, mask in tree_masks.items():
        query_len = query_lens[row]
        if query_len > mask.shape[0]:
            raise ValueError(
                f"batch row {row} has {query_len} query tokens but its speculative "
                f"tree only {mask.shape[0]}: the tree must cover the root and every "
                "scheduled draft token")
        if query_len > 0:
            rows[row] = mask[:query_len, :query_len]
    if chains:
        for row, query_len in enumerate(query_lens):
            if row not in rows and 1 < query_len <= MAX_SPEC_TOKENS:
                rows[row] = ancestor_mask(chain_parents(query_len))
    return rows


def sub_batch(query_start_loc: Sequence[int], rows: Sequence[int]):
    """Token indices (int64) and the compact query_start_loc (int32) of ``rows``."""
    spans = [torch.arange(query_start_loc[r], query_start_loc[r + 1]) for r in rows]
    lens = [query_start_loc[r + 1] - query_start_loc[r] for r in rows]
    starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return torch.cat(spans), starts


@dataclasses.dataclass
class TreeRows:
    """The rows verified by hybrid attention."""

    rows: list[int]
    token_index: torch.Tensor  # [num_tree_tokens] int64, into the batch's tokens
    query_start_loc: torch.Tensor  # [num_tree_rows + 1] int32
    prefix_lens: torch.Tensor  # [num_tree_rows] int32: committed tokens in the cache
    # [num_tree_rows, max_blocks] int32, the KV-cache group's (empty until
    # ``with_block_table``: the other fields are the same for every group)
    block_table: torch.Tensor
    ancestor_bits: torch.Tensor  # [num_tree_tokens, 4] int32
    max_query_len: int  # host-side, so kernels need no device sync
    max_prefix_len: int  # host-side upper bound (the batch's longest sequence)

    @classmethod
    def build(cls, masks: Mapping[int, torch.Tensor], query_start_loc: Sequence[int],
              seq_lens: torch.Tensor, max_seq_len: int) -> TreeRows:
        """``seq_lens``: the batch's, on its device; every other tensor is made
        there too (host-built ones copied without blocking)."""
        device = seq_lens.device
        rows = sorted(masks)
        token_index, qsl = sub_batch(query_start_loc, rows)
        query_lens = qsl[1:] - qsl[:-1]
        row_index = torch.tensor(rows, device=device)
        to_device = dict(device=device, non_blocking=True)
        qsl_device = qsl.to(**to_device)
        return cls(
            rows=rows,
            token_index=token_index.to(**to_device),
            query_start_loc=qsl_device,
            prefix_lens=(seq_lens[row_index] - (qsl_device[1:] - qsl_device[:-1]))
            .to(torch.int32),
            block_table=torch.empty(len(rows), 0, dtype=torch.int32, device=device),
            ancestor_bits=pack_ancestor_bits([masks[r] for r in rows]).to(**to_device),
            max_query_len=int(query_lens.max()),
            max_prefix_len=max_seq_len,
        )

    def with_block_table(self, block_table: torch.Tensor) -> TreeRows:
        """These rows of a KV-cache group's [num_reqs, max_blocks] block table."""
        rows = torch.tensor(self.rows, device=block_table.device)
        return dataclasses.replace(self, block_table=block_table[rows].contiguous())


def check_impl_supports_trees(impl, key, sliding_window: bool,
                              more_problems: Sequence[str] = ()) -> None:
    """Raise ``NotImplementedError`` naming every feature of this attention
    layer that hybrid tree attention does not implement."""
    problems = [name for name, present in (
        ("KV-sharing layers (no key/value)", key is None),
        ("ALiBi", impl.alibi_slopes is not None),
        ("logits soft-capping", bool(impl.logits_soft_cap)),
        ("attention sinks", impl.sinks is not None),
        ("sliding window", sliding_window),
    ) if present]
    problems += list(more_problems)
    if problems:
        raise NotImplementedError(
            "hybrid tree attention does not support " + ", ".join(problems))
