"""Tree mode's verification, in the place and the layout of vLLM's rejection sampler.

The runner calls ``rejection_sampler(metadata, draft_probs, logits,
sampling_metadata)`` after every target forward that carried drafts. For a step
that verifies trees (the ``TreeStep`` it takes from ``TreeRounds.end_step``),
``TreeRejectionSampler`` verifies the whole batch with ``verify_step``, moves
each accepted path to where vLLM expects it (``layout.commit_accepted_paths``)
and returns vLLM's ``SamplerOutput``: row r holds its accepted tokens then the
bonus token, so the scheduler's accounting (computed tokens, spec-decode
metrics: a accepted of N drafted) follows unchanged. Any other step goes to
vLLM's own sampler.

``verify_step`` takes the batch as vLLM lays it out: row r of the batch scheduled ``num_drafts[r]``
draft tokens after its root and got ``num_drafts[r] + 1`` rows of target
logits, one per slot (root first), rows of consecutive requests following each
other. A row is verified as:

- its tree (``ProposedTree``) when it carries one: ``tree.verify``;
- a chain when it carries drafts but no tree (e.g. a request whose tree was
  not scheduled in the step after it was drafted, re-verifying vLLM's stale
  drafts);
- its bonus token alone when it carries no drafts (a prompt chunk).

A sampled row is verified against the draft distributions its tree's children
were drawn from, cut and zero-padded to the scheduled nodes. A row without them
(a chain, a tree drafted in an all-greedy step) counts its drafts as
deterministic proposals (``first_child_draft_probs``), which is lossless;
greedy rows never need them. Rows of the same shape are verified together.
The result is vLLM's format: ``[num_reqs, max_drafts + 1]`` int32, each row its
accepted tokens then the bonus token, -1 padded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from vllm.v1.outputs import SamplerOutput

from vllm_longspec.runner.layout import commit_accepted_paths
from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.runner.seeded import seeded_rows, target_draws
from vllm_longspec.runner.step import ProposedTree, TreeRounds
from vllm_longspec.tree import BatchSampling, DraftTree, verify, verify_by_target_draws
from vllm_longspec.tree.verify import first_child_draft_probs

PLACEHOLDER_TOKEN_ID = -1  # vLLM's rejection_sampler.PLACEHOLDER_TOKEN_ID


class TreeRejectionSampler(nn.Module):
    def __init__(self, chain_sampler: nn.Module, runner, rounds: TreeRounds):
        super().__init__()
        self.chain_sampler = chain_sampler  # SeededChainVerification(vLLM's)
        self.runner = runner
        self.rounds = rounds

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        step = self.rounds.end_step()
        if step is None:
            return self.chain_sampler(metadata, draft_probs, logits, sampling_metadata)
        num_drafts = metadata.num_draft_tokens
        draws = target_draws(self.runner, seeded_rows(self.runner, len(num_drafts)),
                             num_drafts, logits, sampling_metadata)
        result = verify_step(
            step.trees, num_drafts, metadata.draft_token_ids, logits.float(),
            batch_sampling(sampling_metadata, len(num_drafts)), draws)
        commit_accepted_paths(self.runner, self.rounds.target_kv_groups, step.trees,
                              result.accepted_paths)
        return SamplerOutput(sampled_token_ids=result.sampled_token_ids,
                             logprobs_tensors=None)


@dataclass(frozen=True)
class StepVerification:
    # [num_reqs, max_drafts + 1] int32: accepted tokens, then the bonus; -1 padded
    sampled_token_ids: torch.Tensor
    # tree row -> its accepted path, node ids by depth (depth 1 first)
    accepted_paths: dict[int, list[int]]


def verify_step(
    trees: Mapping[int, ProposedTree],
    num_drafts: Sequence[int],
    draft_token_ids: torch.Tensor,  # [sum(num_drafts)] the scheduled drafts, row-major
    logits: torch.Tensor,  # [sum(num_drafts) + num_reqs, V] target logits per slot
    sampling: BatchSampling,
    target_draws: Mapping[int, Callable[[int], int]] | None = None,
) -> StepVerification:
    """Verify every row of the batch; ``trees`` maps tree rows to their tree.
    Rows in ``target_draws`` (seeded rows, ``runner/seeded.py``) are verified
    by the target's own draws, ``verify_by_target_draws``."""
    device = logits.device
    num_reqs, vocab_size = len(num_drafts), logits.shape[-1]
    # e.g. num_drafts [2, 0, 3]: drafts start at [0, 2, 2], logits at [0, 3, 4]
    draft_starts = torch.tensor([0, *itertools.accumulate(num_drafts)][:num_reqs],
                                device=device)
    logit_starts = draft_starts + torch.arange(num_reqs, device=device)

    out = torch.full((num_reqs, max(num_drafts) + 1), PLACEHOLDER_TOKEN_ID,
                     dtype=torch.int32, device=device)
    accepted_paths: dict[int, list[int]] = {}
    shapes: dict[tuple[int, ...], list[int]] = {}
    for row, n in enumerate(num_drafts):
        tree = trees.get(row)
        shape = (tuple(tree.parents.tolist()) if tree is not None
                 else tuple(range(-1, n - 1)))
        if target_draws and row in target_draws:
            start = int(draft_starts[row])
            emitted, path = verify_by_target_draws(
                shape, draft_token_ids[start:start + n].tolist(), target_draws[row])
            out[row, :len(emitted)] = torch.tensor(emitted, dtype=torch.int32)
            if tree is not None:
                accepted_paths[row] = path
            continue
        shapes.setdefault(shape, []).append(row)

    for parents, rows in shapes.items():
        n = len(parents)
        index = torch.tensor(rows, device=device)
        slots = torch.arange(n + 1, device=device)
        row_logits = logits[logit_starts[index, None] + slots]  # [G, n + 1, V]
        row_sampling = sampling.select(rows)
        if n == 0:
            out[index, 0] = _sample_bonus(row_logits[:, 0], row_sampling).to(torch.int32)
            continue
        tokens = draft_token_ids[draft_starts[index, None] + slots[:n]].long()  # [G, n]
        tree = DraftTree.from_parents(tokens, torch.tensor(parents, device=device)
                                      .expand(len(rows), n))
        draft_probs = None
        if not bool(row_sampling.is_greedy.all()):
            draft_probs = _draft_probs(tree, rows, trees, row_sampling.is_greedy.tolist(),
                                       vocab_size)
        verification = verify(tree, row_logits, row_sampling, draft_probs)
        emitted = verification.emitted_tokens.to(torch.int32)  # [G, depth + 1]
        out[index, : emitted.shape[1]] = emitted
        num_accepted = (verification.num_emitted - 1).tolist()
        for row, path, count in zip(rows, verification.accepted_nodes.tolist(),
                                    num_accepted, strict=True):
            if row in trees:
                accepted_paths[row] = path[:count]
    return StepVerification(out, accepted_paths)


def _draft_probs(tree: DraftTree, rows: Sequence[int], trees: Mapping[int, ProposedTree],
                 greedy: Sequence[bool], vocab_size: int) -> torch.Tensor:
    """[G, n, V] q at slots 0..n-1 (every slot that can have children) of a
    group's rows: each sampled tree's own (cut, then zero-padded: a level-ordered
    tree leaves out its leaves' rows), first-child one-hots for the others."""
    n = tree.num_nodes
    probs = first_child_draft_probs(tree, vocab_size)
    own_rows, own_probs = [], []
    for i, (row, is_greedy) in enumerate(zip(rows, greedy, strict=True)):
        proposal = trees.get(row)
        if proposal is not None and proposal.draft_probs is not None and not is_greedy:
            own = proposal.draft_probs
            own_rows.append(i)
            own_probs.append(own if own.shape[0] <= n else own[:n])
    if own_rows:
        # [G', R, V] zero-padded to the longest, R <= n
        padded = torch.nn.utils.rnn.pad_sequence(own_probs, batch_first=True)
        probs[torch.tensor(own_rows, device=probs.device), :padded.shape[1]] = padded
    return probs


def _sample_bonus(logits: torch.Tensor, sampling: BatchSampling) -> torch.Tensor:
    """[G, V] -> [G] the argmax for greedy rows, a draw from the target otherwise."""
    greedy = logits.argmax(-1)
    if bool(sampling.is_greedy.all()):
        return greedy
    noise = sampling.exponentials(logits.shape[-1], device=logits.device)
    drawn = (sampling.target_probs(logits) / noise).argmax(-1)
    return torch.where(sampling.is_greedy, greedy, drawn)
