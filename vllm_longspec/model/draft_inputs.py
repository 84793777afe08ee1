"""What the draft reads in one forward besides its tokens and positions.

``DraftInputs`` is that, in one argument of the draft's forward: the round's
cross-attention inputs (the target's committed prefix, read in place), the
rows that run the whole block, and for a tree level the self-attention over
the window and the nodes' ancestors (``LevelSelfAttention``).

Our own forwards (the tree levels, ``runner/tree_drafter.py``) pass it. vLLM's
proposer runs the chain's forwards itself and calls the model with tokens and
positions only; for those the one hand-over is ``DraftRound``: the LongSpec
proposer opens a round around vLLM's ``propose`` (set and reset in that one
``with``, like nano-vllm's context), vLLM's first-pass input preparation names
the rows it samples (``sample_first_pass_at``), and each forward asks the open
round for its ``DraftInputs``. The round keeps the first pass's output at those
rows (the trees grow from the roots' hidden states).
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextvars import ContextVar

import torch

from vllm_longspec.model.level_attention import LevelSelfAttention


@dataclasses.dataclass(frozen=True)
class CrossAttentionInputs:
    """The committed target prefix one drafting round reads (same all round)."""

    # [num_blocks, num_kv_heads, block_size, head_size] views of the target's
    # last-layer cache (no copy, ``attention.kv_cache.split_kv_cache``)
    target_key_cache: torch.Tensor
    target_value_cache: torch.Tensor
    # [num_reqs, max_blocks] the target group's block table
    block_table: torch.Tensor
    # [num_reqs] int32 target KV positions 0..n-1 that are verified
    committed_lens: torch.Tensor
    # the ISA vLLM's CPU backend packed the cache with; None off CPU
    cpu_isa: str | None

    @property
    def num_reqs(self) -> int:
        return self.committed_lens.shape[0]


@dataclasses.dataclass(frozen=True)
class DraftInputs:
    """Everything one forward of the draft reads besides tokens and positions."""

    cross_attention: CrossAttentionInputs
    # [n] int64 token index of each row that runs the whole block (cross-attention,
    # MLP); None: the first num_reqs tokens, one per request
    rows: torch.Tensor | None = None
    # [num_reqs + 1] int32 split of those rows among the requests when a request
    # has several (the nodes of a tree level); None: one row per request
    query_start_loc: torch.Tensor | None = None
    # a tree level's self-attention (window + ancestors, nothing written to the
    # cache) in place of the draft's vLLM attention layer; None: that layer
    level_attention: LevelSelfAttention | None = None

    def full_rows(self, device: torch.device) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.long()
        return torch.arange(self.cross_attention.num_reqs, device=device)


_OPEN_ROUND: ContextVar[DraftRound | None] = ContextVar("longspec_draft_round",
                                                        default=None)


class DraftRound:
    """The hand-over to the draft forwards vLLM runs during one drafting round.

    First pass: every token the target just verified (they only write their
    self-attention K/V into the window) and each request's new token, whose row
    (``first_pass_rows``) runs the whole block. Later chain steps: one token per
    request, all running the whole block.
    """

    def __init__(self, cross_attention: CrossAttentionInputs, *, window_only: bool = False):
        self.cross_attention = cross_attention
        # A round that proposes nothing (the policy chose K = 0 for every
        # request): the first pass only writes the window's K/V, no row runs
        # the whole block.
        self.window_only = window_only
        # [num_reqs] the first pass's sampled rows, until the first pass ran
        self.first_pass_rows: torch.Tensor | None = None
        # [num_reqs, hidden_size] the whole block's output at those rows
        self.first_pass_output: torch.Tensor | None = None
        # chain positions drafted so far (seeded requests' coupled draws)
        self.drafted_positions = 0

    @contextlib.contextmanager
    def open(self):
        token = _OPEN_ROUND.set(self)
        try:
            yield self
        finally:
            _OPEN_ROUND.reset(token)

    @staticmethod
    def current() -> DraftRound | None:
        """The round open in this context; None outside drafting (warm-up,
        memory profiling)."""
        return _OPEN_ROUND.get()

    def sample_first_pass_at(self, rows: torch.Tensor) -> None:
        """vLLM's first-pass preparation: the token index of each request's
        sampled row (``token_indices_to_sample``)."""
        self.first_pass_rows = rows

    def next_draft_position(self) -> int:
        """The chain position (1: the first draft after the step's tokens) of
        the draft tokens vLLM is about to sample."""
        self.drafted_positions += 1
        return self.drafted_positions

    def next_forward(self) -> DraftInputs | None:
        """The inputs of the forward about to run: the first pass's while its
        rows are pending, else a later chain step's; None in a window-only
        round (self-attention alone)."""
        if self.window_only:
            return None
        return DraftInputs(self.cross_attention, rows=self.first_pass_rows)

    def forward_done(self, inputs: DraftInputs, row_output: torch.Tensor) -> None:
        """``row_output``: [len(rows), hidden_size] the whole block's output."""
        if inputs.rows is not None and inputs.rows is self.first_pass_rows:
            self.first_pass_output = row_output
            self.first_pass_rows = None
