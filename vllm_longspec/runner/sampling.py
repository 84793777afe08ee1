"""Sampling in tree mode: vLLM's settings as ``BatchSampling``, and what is refused.

Tree drafting and verification support what ``BatchSampling`` models:
temperature, top-k, top-p and seeded generators. The target distribution is
filtered by vLLM's own top-k / top-p function (``apply_top_k_top_p``), the one
its sampler and rejection sampler use, so tree mode samples what vLLM samples
(tokens tied with the k-th logit included).

Settings whose meaning along a tree branch vLLM's chain code does not give
(penalties, bad words and minimum lengths depend on the tokens before each
slot, grammars walk one sequence, logprobs are reported per chain position),
or that vLLM applies outside the rejection sampler, are refused when a request
carrying them arrives: by the front end's request validation
(``patches/request_validation.py``, the request fails alone), and again by the
worker as a safeguard.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.ops import topk_topp_sampler

from vllm_longspec.tree.sampling import BatchSampling

# Set when not None (``logprobs=0`` still asks for the sampled token's logprob).
NOT_NONE = object()
# SamplingParams field -> its neutral value (None: any falsy value)
UNSUPPORTED_SETTINGS = {
    "logprobs": NOT_NONE,
    "logprob_token_ids": NOT_NONE,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "bad_words": None,
    "allowed_token_ids": None,
    "logit_bias": None,
    "min_p": 0.0,
    "min_tokens": 0,
    "structured_outputs": None,
    "thinking_token_budget": None,
    "watermarking": None,
}


class UnsupportedTreeSamplingError(NotImplementedError):
    """A request asked for a sampling setting that tree speculation lacks."""

    def __init__(self, message: str, settings: list[str]):
        super().__init__(message)
        self.settings = settings


def check_request_supported(req_id: str | None, sampling_params) -> None:
    """Raise for a request whose ``SamplingParams`` tree mode cannot honour
    (``req_id`` None: a request that has no id yet)."""
    if sampling_params is None:
        return
    used = unsupported_settings(sampling_params)
    if used:
        raise UnsupportedTreeSamplingError(
            f"{'This request' if req_id is None else f'Request {req_id!r}'} sets "
            f"{', '.join(used)}, which LongSpec tree "
            "speculation does not support yet; leave 'tree' out of "
            "--speculative-config to draft chains.", used)


def unsupported_settings(sampling_params) -> list[str]:
    """The fields of ``UNSUPPORTED_SETTINGS`` that ``sampling_params`` sets."""
    return [name for name, neutral in UNSUPPORTED_SETTINGS.items()
            if _is_set(getattr(sampling_params, name, neutral), neutral)]


def batch_sampling(sampling_metadata, num_reqs: int) -> BatchSampling:
    """The first ``num_reqs`` rows of vLLM's ``SamplingMetadata`` (runner order)."""
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
        # looked up at each step, so a patch of vLLM's function applies here too
        top_k_top_p=topk_topp_sampler.apply_top_k_top_p,
    )


def _is_set(value, neutral) -> bool:
    if neutral is NOT_NONE:
        return value is not None
    return bool(value) if neutral is None else value != neutral
