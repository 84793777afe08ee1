"""Seeded, sampled requests get plain vLLM's tokens, however they are speculated.

vLLM's contract for a request with ``seed``: the same tokens every time.
Rejection sampling keeps the output distribution, but which tokens a seeded
request gets then depends on how many drafts each of its steps verified, and
that depends on the rest of the engine: the policy's K (acceptance statistics of
every request, measured step times, the batch size), steps cut short by the
token budget, trees of other shapes. The same seeded request came out
differently alone, batched and after prefix-cache hits.

So a seeded row is verified by the target's own draws
(``tree.verify.verify_by_target_draws``): along the accepted path, the target
samples each slot's token exactly as vLLM's sampler does in plain decoding
(``TargetDraw``: float32 logits, the row's temperature, vLLM's top-k / top-p
sampler with the request's generator: one draw per emitted token), and a draft
is accepted when it equals that token. Every emitted token is the one plain
vLLM samples there for that seed, so a seeded request's output is plain
decoding's (in float32, token for token) whatever was drafted and whatever
else ran; the drafts only decide how many of its tokens a step emits. A draft
that did not see the draw is accepted with probability p(token), as a
deterministic proposal is by the rejection sampler.

The drafts of these rows must leave the request's generator alone: the chain
drafter proposes, at chain position i, plain vLLM's sample from the draft's
logits with the draw the target will use there, peeked
(``coupled_draft_tokens``: the two mostly agree when the distributions do);
the tree drafter draws them from the global generator.

Rows covered (``seeded_rows``): a generator (vLLM makes one for seeded, sampled
requests), temperature > 0, and no setting beyond temperature / top-k / top-p
(``unsupported_settings``: penalties, logprobs, ... are applied outside this
path); such other seeded rows keep vLLM's rejection sampling with their
generator, reproducible only under the same schedule.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

from vllm_longspec.runner.sampling import unsupported_settings
from vllm_longspec.tree import verify_by_target_draws

_SAMPLING_EPS = 1e-5       # vLLM's: a lower temperature is greedy


def seeded_rows(runner, num_reqs: int) -> dict[int, torch.Generator]:
    """Row -> generator of the rows verified by the target's own draws."""
    batch = runner.input_batch
    rows = {}
    for row, generator in batch.generators.items():
        if row >= num_reqs:
            continue
        state = runner.requests.get(batch.req_ids[row])
        params = None if state is None else state.sampling_params
        if (params is not None and params.temperature >= _SAMPLING_EPS
                and not unsupported_settings(params)):
            rows[row] = generator
    return rows


def plain_draws(sampler, logits: torch.Tensor, row: int, sampling_metadata,
                generator: torch.Generator) -> torch.Tensor:
    """[n, V] logits -> [n] the next n tokens plain vLLM would sample for
    ``row``'s request from them, the j-th from row j: ``Sampler.sample`` for a
    sampled row (float32 logits divided by the temperature, then vLLM's top-k /
    top-p sampler), each taking the generator's next draw."""
    n = logits.shape[0]
    scaled = logits.to(torch.float32, copy=True)
    scaled.div_(sampling_metadata.temperature[row:row + 1].unsqueeze(1))
    top_k, top_p = sampling_metadata.top_k, sampling_metadata.top_p
    sampled, _ = sampler.topk_topp_sampler(
        scaled, dict.fromkeys(range(n), generator),
        None if top_k is None else top_k[row:row + 1].expand(n),
        None if top_p is None else top_p[row:row + 1].expand(n))
    return sampled


class TargetDraw:
    """``draw(slot)`` for ``verify_by_target_draws``: the target's token at one
    slot of a row, sampled as plain vLLM samples it (``plain_draws``)."""

    def __init__(self, sampler, logits: torch.Tensor, row: int, sampling_metadata,
                 generator: torch.Generator):
        self.sampler, self.logits, self.row = sampler, logits, row
        self.sampling_metadata, self.generator = sampling_metadata, generator

    def __call__(self, slot: int) -> int:
        return int(plain_draws(self.sampler, self.logits[slot:slot + 1], self.row,
                               self.sampling_metadata, self.generator)[0])


def coupled_draft_tokens(sampler, logits: torch.Tensor, position: int,
                         rows: Mapping[int, torch.Generator],
                         sampling_metadata) -> dict[int, int]:
    """Row -> the draft's token at chain position ``position`` (1: the first
    draft after this step's tokens) for seeded rows: plain vLLM's sampler on the
    draft's logits with the draw the target will use at that position (the
    generator's ``position``-th next draw, peeked: the state is put back). When
    draft and target agree on the likely tokens, they mostly draw the same one
    (a coupling), so the draft is accepted far more often than an independent
    draw would be; the verification is unchanged (``verify_by_target_draws``)."""
    tokens = {}
    for row, generator in rows.items():
        if row >= logits.shape[0]:
            continue
        state = generator.get_state()
        try:
            tokens[row] = int(plain_draws(sampler, logits[row].expand(position, -1), row,
                                          sampling_metadata, generator)[-1])
        finally:
            generator.set_state(state)
    return tokens


def target_draws(runner, rows: Mapping[int, torch.Generator], num_drafts: Sequence[int],
                 logits: torch.Tensor, sampling_metadata) -> dict[int, TargetDraw]:
    """Row -> its ``TargetDraw`` over its slots of ``logits`` (vLLM's layout:
    ``num_drafts[r] + 1`` rows per request, one request after the other),
    for the rows that verify drafts this step; the logits are copied."""
    draws, start = {}, 0
    for row, n in enumerate(num_drafts):
        if row in rows and n > 0:
            draws[row] = TargetDraw(runner.sampler, logits[start:start + n + 1].clone(),
                                    row, sampling_metadata, rows[row])
        start += n + 1
    return draws


def samples_as_plain(sampling_metadata) -> bool:
    """Whether vLLM's sampler alone gives a step without drafts exactly what the
    rejection sampler would: no logprobs (formatted by each differently), no
    penalties, bad words or thinking budget (which the rejection sampler's
    bonus draw reads together with the scheduled drafts)."""
    return (sampling_metadata.max_num_logprobs is None
            and sampling_metadata.no_penalties
            and not sampling_metadata.bad_words_token_ids
            and sampling_metadata.thinking_budget_state_holder is None)


class SeededChainVerification(nn.Module):
    """vLLM's rejection sampler, with seeded rows verified by the target's own
    draws: vLLM's result for them is replaced and their generators are put
    back as they were before vLLM's sampler drew from them."""

    def __init__(self, chain_sampler: nn.Module, runner):
        super().__init__()
        self.chain_sampler = chain_sampler
        self.runner = runner

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if metadata.max_spec_len == 0 and samples_as_plain(sampling_metadata):
            # No request verifies a draft (the policy chose K = 0 for all):
            # sample as plain decoding does, one draw per request, without the
            # rejection sampler's extra passes (~0.4 ms per step at batch 8).
            return self.runner.sampler(logits=logits, sampling_metadata=sampling_metadata)
        num_drafts = metadata.num_draft_tokens
        rows = seeded_rows(self.runner, len(num_drafts))
        draws = target_draws(self.runner, rows, num_drafts, logits, sampling_metadata)
        states = {row: rows[row].get_state() for row in draws}
        output = self.chain_sampler(metadata, draft_probs, logits, sampling_metadata)
        if not draws:
            return output
        for row, state in states.items():
            rows[row].set_state(state)
        drafts = metadata.draft_token_ids.tolist()
        starts = [0, *itertools.accumulate(num_drafts)]
        for row, draw in draws.items():
            n = num_drafts[row]
            emitted, _ = verify_by_target_draws(
                range(-1, n - 1), drafts[starts[row]:starts[row] + n], draw)
            out = output.sampled_token_ids[row]
            out.fill_(PLACEHOLDER_TOKEN_ID)
            out[:len(emitted)] = torch.tensor(emitted, dtype=out.dtype)
        return output
