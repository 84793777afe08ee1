"""Tree verification in the place of vLLM's rejection sampler.

The runner calls ``rejection_sampler(metadata, draft_probs, logits,
sampling_metadata)`` after every target forward that carried drafts. For a step
that verifies trees (``TreeRounds.step``), ``TreeRejectionSampler`` verifies
the whole batch with ``verification.verify_step``, moves each accepted path to
where vLLM expects it (``layout.commit_accepted_paths``) and returns vLLM's
``SamplerOutput``: row r holds its accepted tokens then the bonus token, so the
scheduler's accounting (computed tokens, spec-decode metrics: a accepted of N
drafted) follows unchanged. Any other step goes to vLLM's own sampler.
"""

from __future__ import annotations

from torch import nn
from vllm.v1.outputs import SamplerOutput

from vllm_longspec.runner.layout import commit_accepted_paths
from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.runner.step import TreeRounds
from vllm_longspec.runner.verification import verify_step


class TreeRejectionSampler(nn.Module):
    def __init__(self, chain_sampler: nn.Module, runner, rounds: TreeRounds):
        super().__init__()
        self.chain_sampler = chain_sampler  # vLLM's RejectionSampler
        self.runner = runner
        self.rounds = rounds

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        step = self.rounds.end_step()
        if step is None:
            return self.chain_sampler(metadata, draft_probs, logits, sampling_metadata)
        num_drafts = metadata.num_draft_tokens
        result = verify_step(
            step.trees, num_drafts, metadata.draft_token_ids, logits.float(),
            batch_sampling(sampling_metadata, len(num_drafts)))
        commit_accepted_paths(self.runner, self.rounds.target_kv_groups, step.trees,
                              result.accepted_paths)
        return SamplerOutput(sampled_token_ids=result.sampled_token_ids,
                             logprobs_tensors=None)
