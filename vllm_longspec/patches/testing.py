"""Test-only patch: the test suite's proposer modes and marker file.

Target: LongSpec's own classes, not vLLM's: ``LongSpecProposer``
    (``_adaptive_chains``, ``_propose_chain``, ``_propose_trees``,
    ``_draft_trees``) and
    ``HybridCPUAttentionImpl.forward_planned``.
Why: engine tests need multi-token acceptance from a random draft (replayed
    proposals, ``testing.TestProposer``), the draft's logits for the parity
    test (``testing.DraftRecorder``) and proof that the hybrid attention path
    ran in the worker process (a marker file). None of it belongs on the
    serving path.
How: ``plugin.register`` calls ``apply`` only when one of ``TEST_ENV_VARS`` is
    set (in every vLLM process, like the plugin). Each wrap calls the original,
    then adds the test behaviour; replayed or recorded rounds need vLLM's full
    chain every step, so adaptive chains are off with them.
When it can go: never (tests only).
"""

from __future__ import annotations

import functools
import os

from vllm_longspec.testing import ENV_VAR, RECORD_ENV_VAR, DraftRecorder, TestProposer

# A file created the first time a process runs the hybrid attention path.
USED_MARKER_ENV = "VLLM_LONGSPEC_HYBRID_USED_MARKER"
TEST_ENV_VARS = (ENV_VAR, RECORD_ENV_VAR, USED_MARKER_ENV)

_orig__adaptive_chains = None
_orig__propose_chain = None
_orig__propose_trees = None
_orig__draft_trees = None
_orig_forward_planned = None


def requested() -> bool:
    return any(os.environ.get(name) for name in TEST_ENV_VARS)


def apply() -> None:
    global _orig__adaptive_chains, _orig__propose_chain, _orig__draft_trees
    global _orig__propose_trees, _orig_forward_planned
    from vllm_longspec.attention.cpu_backend import HybridCPUAttentionImpl
    from vllm_longspec.runner.proposer import LongSpecProposer

    if _orig__propose_chain is not None:
        return
    test_proposer, recorder = TestProposer.from_env(), DraftRecorder.from_env()
    marker = os.environ.get(USED_MARKER_ENV)
    _orig__adaptive_chains = LongSpecProposer._adaptive_chains
    _orig__propose_chain = LongSpecProposer._propose_chain
    _orig__propose_trees = LongSpecProposer._propose_trees
    _orig__draft_trees = LongSpecProposer._draft_trees
    # [num_reqs] this round's tree roots (the bonus tokens), for the tree
    # replay: set by _propose_trees around the round, read by _draft_trees
    round_roots: list = []
    _orig_forward_planned = HybridCPUAttentionImpl.forward_planned

    @functools.wraps(_orig__adaptive_chains)
    def _adaptive_chains(self, config):
        if test_proposer is not None or recorder is not None:
            return None
        return _orig__adaptive_chains(self, config)

    @functools.wraps(_orig__propose_chain)
    def _propose_chain(self, cross_attention, num_steps, *first_pass, **kwargs):
        recording = recorder is not None and recorder.active
        captured = DraftRecorder.capture(self.model) if recording else None
        try:
            draft_token_ids = _orig__propose_chain(self, cross_attention, num_steps,
                                                   *first_pass, **kwargs)
        finally:
            if recording:
                DraftRecorder.release(self.model)
        if recording:
            recorder.save(captured, draft_token_ids, self.runner,
                          cross_attention.committed_lens)
        if test_proposer is not None:
            # first_pass[3]: next_token_ids, each request's bonus token
            draft_token_ids = test_proposer.override(draft_token_ids, self.runner,
                                                     cross_attention.committed_lens,
                                                     first_pass[3])
            self._last_draft_probs = None  # replayed drafts are deterministic
        return draft_token_ids

    @functools.wraps(_orig__propose_trees)
    def _propose_trees(self, cross_attention, window_block_table, *first_pass, **kwargs):
        round_roots.append(first_pass[3])  # next_token_ids: the trees' roots
        try:
            return _orig__propose_trees(self, cross_attention, window_block_table,
                                        *first_pass, **kwargs)
        finally:
            round_roots.clear()

    @functools.wraps(_orig__draft_trees)
    def _draft_trees(self, root_hidden, cross_attention, *args, **kwargs):
        beam = _orig__draft_trees(self, root_hidden, cross_attention, *args, **kwargs)
        if test_proposer is None:
            return beam
        return test_proposer.override_tree(beam, self.runner,
                                           cross_attention.committed_lens,
                                           round_roots[0])

    @functools.wraps(_orig_forward_planned)
    def forward_planned(self, *args, **kwargs):
        output = _orig_forward_planned(self, *args, **kwargs)
        if marker and not os.path.exists(marker):
            open(marker, "a").close()
        return output

    LongSpecProposer._adaptive_chains = _adaptive_chains
    LongSpecProposer._propose_chain = _propose_chain
    LongSpecProposer._propose_trees = _propose_trees
    LongSpecProposer._draft_trees = _draft_trees
    HybridCPUAttentionImpl.forward_planned = forward_planned
