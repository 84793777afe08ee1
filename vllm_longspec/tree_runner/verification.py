"""One target forward's verification, in the layout of vLLM's rejection sampler.

Input as vLLM lays it out: row r of the batch scheduled ``num_drafts[r]``
draft tokens after its root and got ``num_drafts[r] + 1`` rows of target
logits, one per slot (root first), rows of consecutive requests following each
other. A row is verified as:

- its tree (``ProposedTree``) when it carries one: ``tree.verify``;
- a chain when it carries drafts but no tree (e.g. the zero drafts vLLM
  schedules when the drafter could not run); without draft distributions the
  drafts count as deterministic proposals (q one-hot), which is lossless;
- its bonus token alone when it carries no drafts (a prompt chunk).

Rows of the same shape are verified together. The result is vLLM's format:
``[num_reqs, max_drafts + 1]`` int32, each row its accepted tokens then the
bonus token, -1 padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vllm_longspec.tree import BatchSampling, DraftTree, verify
from vllm_longspec.tree_runner.rounds import ProposedTree

PLACEHOLDER_TOKEN_ID = -1  # vLLM's rejection_sampler.PLACEHOLDER_TOKEN_ID


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
) -> StepVerification:
    """Verify every row of the batch; ``trees`` maps tree rows to their tree."""
    num_reqs = len(num_drafts)
    draft_starts = [0] * num_reqs
    logit_starts = [0] * num_reqs
    for row in range(1, num_reqs):
        draft_starts[row] = draft_starts[row - 1] + num_drafts[row - 1]
        logit_starts[row] = logit_starts[row - 1] + num_drafts[row - 1] + 1

    shapes: dict[tuple, list[int]] = {}
    for row, n in enumerate(num_drafts):
        tree = trees.get(row)
        shape = (tuple(tree.parents.tolist()) if tree is not None
                 else tuple(range(-1, n - 1)))
        shapes.setdefault(shape, []).append(row)

    out = torch.full((num_reqs, max(num_drafts) + 1), PLACEHOLDER_TOKEN_ID,
                     dtype=torch.int32, device=logits.device)
    accepted_paths: dict[int, list[int]] = {}
    for parents, rows in shapes.items():
        n = len(parents)
        index = torch.tensor(rows, device=logits.device)
        # [G, n + 1, V]
        row_logits = logits[torch.tensor(logit_starts, device=logits.device)[index, None]
                            + torch.arange(n + 1, device=logits.device)]
        row_sampling = sampling.select(rows)
        if n == 0:
            out[index, 0] = _sample_bonus(row_logits[:, 0], row_sampling).to(torch.int32)
            continue
        tokens = torch.stack([draft_token_ids[draft_starts[r]:draft_starts[r] + n]
                              for r in rows]).long()
        tree = DraftTree.from_parents(tokens, torch.tensor([parents] * len(rows)))
        draft_probs = None
        if not bool(row_sampling.is_greedy.all()):
            draft_probs = torch.stack([
                _draft_probs(trees.get(r), tokens[i], logits.shape[-1])
                for i, r in enumerate(rows)])
        verification = verify(tree, row_logits, row_sampling, draft_probs)
        emitted = verification.emitted_tokens.to(torch.int32)  # [G, depth + 1]
        out[index, : emitted.shape[1]] = emitted
        for i, row in enumerate(rows):
            if row in trees:
                path = verification.accepted_nodes[i]
                accepted_paths[row] = path[path >= 0].tolist()
    return StepVerification(out, accepted_paths)


def _draft_probs(tree: ProposedTree | None, tokens: torch.Tensor,
                 vocab_size: int) -> torch.Tensor:
    """[n, V] q at slots 0..n-1 (every slot that can have children)."""
    n = tokens.shape[0]
    if tree is None:  # deterministic chain proposals: slot s proposed tokens[s]
        return torch.nn.functional.one_hot(tokens, vocab_size).float()
    if tree.draft_probs is None:
        raise ValueError("a sampled request's tree carries no draft distributions")
    probs = tree.draft_probs[:n]
    return torch.nn.functional.pad(probs, (0, 0, 0, n - probs.shape[0]))


def _sample_bonus(logits: torch.Tensor, sampling: BatchSampling) -> torch.Tensor:
    """[G, V] -> [G] the argmax for greedy rows, a draw from the target otherwise."""
    greedy = logits.argmax(-1)
    if bool(sampling.is_greedy.all()):
        return greedy
    noise = sampling.exponentials(logits.shape[-1], device=logits.device)
    drawn = (sampling.target_probs(logits) / noise).argmax(-1)
    return torch.where(sampling.is_greedy, greedy, drawn)
