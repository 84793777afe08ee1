"""The rows of a batch that carry speculative trees, as a compact sub-batch.

Shared by the CPU and GPU hybrid backends. Their metadata builders call
``find_tree_masks`` (the ``SpecTreeBatch`` set around the target's metadata
build, see ``spec_trees``) and, when some rows carry a tree, ``TreeRows.build``:
token indices, query_start_loc, committed prefix lengths, block-table rows and
packed ancestor masks of those rows, on the device of the batch's tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vllm_longspec.attention.spec_trees import get_spec_trees, tree_rows_of_batch
from vllm_longspec.tree.limits import MAX_SPEC_TOKENS
from vllm_longspec.tree.mask import pack_ancestor_bits


def applicable_tree_batch(layer_names: Sequence[str]):
    """The ``SpecTreeBatch`` set for this step if it applies to ``layer_names``."""
    trees = get_spec_trees()
    return trees if trees is not None and trees.applies_to(layer_names) else None


def find_tree_masks(layer_names: Sequence[str], query_lens: Sequence[int],
                    chains_too: bool = True) -> dict[int, torch.Tensor]:
    """Row -> [q, q] ancestor mask of every row to verify with hybrid attention.

    The rows of the tree batch set for this step, if it applies to
    ``layer_names`` (not when these are the draft's layers and the trees the
    target's). The debug switch ``VLLM_LONGSPEC_HYBRID_CHAINS=1`` adds every
    other row with 2-128 tokens as a chain; ``chains_too=False`` drops those
    when no tree batch applies.
    """
    trees = applicable_tree_batch(layer_names)
    if trees is None and not chains_too:
        return {}
    return tree_rows_of_batch(trees, query_lens, MAX_SPEC_TOKENS)


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
    block_table: torch.Tensor  # [num_tree_rows, max_blocks] int32
    ancestor_bits: torch.Tensor  # [num_tree_tokens, 4] int32
    max_query_len: int  # host-side, so kernels need no device sync
    max_prefix_len: int  # host-side upper bound (the batch's longest sequence)

    @classmethod
    def build(cls, masks: dict[int, torch.Tensor], query_start_loc: Sequence[int],
              seq_lens: torch.Tensor, block_table: torch.Tensor,
              max_seq_len: int) -> TreeRows:
        """``seq_lens``/``block_table``: the batch's, on its device; every other
        tensor is made there too (host-built ones copied without blocking)."""
        device = block_table.device
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
            block_table=block_table[row_index].contiguous(),
            ancestor_bits=pack_ancestor_bits([masks[r] for r in rows]).to(**to_device),
            max_query_len=int(query_lens.max()),
            max_prefix_len=max_seq_len,
        )


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
