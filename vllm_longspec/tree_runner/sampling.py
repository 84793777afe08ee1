"""vLLM's per-batch sampling settings as the tree code's ``BatchSampling``.

Tree drafting and verification support what ``BatchSampling`` models:
temperature, top-k, top-p and seeded generators. Settings whose meaning along a
tree branch vLLM's chain code does not define (penalties and bad words depend
on the tokens before each slot; logprobs are reported per chain position) are
refused with a clear error the first time a batch carries them.
"""

from __future__ import annotations

import torch

from vllm_longspec.tree.sampling import BatchSampling


class UnsupportedTreeSamplingError(NotImplementedError):
    """A request asked for a sampling setting that tree speculation lacks."""


def batch_sampling(sampling_metadata, num_reqs: int) -> BatchSampling:
    """The first ``num_reqs`` rows of vLLM's ``SamplingMetadata`` (runner order)."""
    _check_supported(sampling_metadata)
    temperature = sampling_metadata.temperature
    if sampling_metadata.all_greedy or temperature is None:
        temperature = torch.zeros(num_reqs)
    top_k, top_p = sampling_metadata.top_k, sampling_metadata.top_p
    return BatchSampling(
        temperature=temperature[:num_reqs].float(),
        top_k=None if top_k is None else top_k[:num_reqs],
        top_p=None if top_p is None else top_p[:num_reqs],
        generators={row: generator
                    for row, generator in sampling_metadata.generators.items()
                    if row < num_reqs},
    )


def _check_supported(sampling_metadata) -> None:
    unsupported = []
    if sampling_metadata.max_num_logprobs is not None:
        unsupported.append("logprobs")
    if not sampling_metadata.no_penalties:
        unsupported.append("presence/frequency/repetition penalties")
    if sampling_metadata.bad_words_token_ids:
        unsupported.append("bad_words")
    if sampling_metadata.allowed_token_ids_mask is not None:
        unsupported.append("allowed_token_ids")
    if unsupported:
        raise UnsupportedTreeSamplingError(
            "LongSpec tree speculation does not support " + ", ".join(unsupported)
            + " yet; leave 'tree' out of --speculative-config to draft chains.")
