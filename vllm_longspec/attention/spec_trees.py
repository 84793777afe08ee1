"""Which tokens of the next target forward form a speculative tree, and its shape.

The proposer knows the trees; the attention backend only sees batch rows. The
hand-over is one process-global ``SpecTreeBatch``, set around the target's
attention-metadata build (the builder reads it once per forward and bakes a
plan into the metadata shared by all layers)::

    from vllm_longspec.attention.spec_trees import SpecTreeBatch, spec_trees

    batch = SpecTreeBatch.from_request_ids(input_batch.req_ids, {"req-7": [-1, 0, 0, 1]})
    with spec_trees(batch):
        ...  # the runner builds the target's attention metadata here

Row r's query tokens are [root, drafts...] (vLLM schedules the last sampled
token followed by the draft tokens); ``parents`` index them, ``parents[0] == -1``
(see ``tree.mask``). If the scheduler sent fewer tokens than the tree has, the
first ``query_len`` tokens are used (topological order keeps that a tree); more
tokens than the tree is an error. Rows without a tree use vLLM's stock kernel
(unless ``VLLM_LONGSPEC_HYBRID_CHAINS=1``, below).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from vllm_longspec.tree.mask import (
    ancestor_mask,
    chain_parents,
    validate_parents,
)

# Debug/benchmark switch (with the hybrid backend registered, i.e. also
# VLLM_LONGSPEC_HYBRID_ATTENTION=1 for chains): verify every short multi-token
# row (chains) with the hybrid path even without a tree. Off by default:
# vLLM's causal kernel is exact for chains, and although the hybrid path is
# faster on the attention alone in most measured shapes (bf16 1.1-2.7x; fp32
# 1.2-2.6x at 5 tokens, 0.83-1.04x at 64), chain decoding through it measured
# within noise end to end (docs/hybrid-attention.md, "Measured").
HYBRID_CHAINS_ENV = "VLLM_LONGSPEC_HYBRID_CHAINS"


@dataclass(frozen=True)
class SpecTreeBatch:
    # batch row -> parents over that row's query tokens
    parents_by_row: Mapping[int, Sequence[int]]
    # the attention layers whose forward verifies the trees (the target's, not
    # a draft model's that shares the backend); None: every layer
    layer_names: frozenset[str] | None = None
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for parents in self.parents_by_row.values():
            validate_parents(parents)

    @classmethod
    def from_request_ids(cls, req_ids: Sequence[str | None],
                         parents_by_request: Mapping[str, Sequence[int]]) -> SpecTreeBatch:
        """Rows follow the runner's ``input_batch.req_ids`` order of this step."""
        rows = {row: parents_by_request[req_id] for row, req_id in enumerate(req_ids)
                if req_id in parents_by_request}
        return cls(rows)

    def applies_to(self, layer_names: Sequence[str]) -> bool:
        """Whether a metadata builder of these layers verifies the trees."""
        return self.layer_names is None or not self.layer_names.isdisjoint(layer_names)

    def mask(self, row: int, query_len: int) -> torch.Tensor:
        """[query_len, query_len] bool ancestor mask of row ``row``."""
        parents = self.parents_by_row[row]
        if query_len > len(parents):
            raise ValueError(
                f"batch row {row} has {query_len} query tokens but its speculative "
                f"tree only {len(parents)}: the tree must cover the root and every "
                f"scheduled draft token")
        key = (row, query_len)
        if key not in self._masks:
            self._masks[key] = ancestor_mask(list(parents)[:query_len])
        return self._masks[key]


_current: SpecTreeBatch | None = None


def set_spec_trees(batch: SpecTreeBatch | None) -> None:
    global _current
    _current = batch


def get_spec_trees() -> SpecTreeBatch | None:
    return _current


@contextlib.contextmanager
def spec_trees(batch: SpecTreeBatch | None):
    previous = get_spec_trees()
    set_spec_trees(batch)
    try:
        yield batch
    finally:
        set_spec_trees(previous)


def hybrid_chains_enabled() -> bool:
    return os.environ.get(HYBRID_CHAINS_ENV, "0") == "1"


def tree_rows_of_batch(batch: SpecTreeBatch | None, query_lens: Sequence[int],
                       max_tokens: int) -> dict[int, torch.Tensor]:
    """Rows to verify with the hybrid path -> their [q, q] masks."""
    rows = {}
    if batch is not None:
        for row in batch.parents_by_row:
            if row < len(query_lens) and query_lens[row] > 0:
                rows[row] = batch.mask(row, query_lens[row])
    if hybrid_chains_enabled():
        for row, query_len in enumerate(query_lens):
            if row not in rows and 1 < query_len <= max_tokens:
                rows[row] = ancestor_mask(chain_parents(query_len))
    return rows


