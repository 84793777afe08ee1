"""Verifying a batch of draft trees against the target's distributions at every slot.

Both rules walk down from the root (slot 0) and emit the accepted path plus one
bonus token, so a round emits between 1 and max_depth + 1 tokens.

Greedy: accept the deepest node whose every path token equals the target's
argmax at its parent; the bonus token is the target's argmax after it. Ties in
the argmax go to the lowest token id, equal-depth matches to the lowest node.

Sampling (recursive rejection sampling): standing at an accepted slot with
target distribution p and draft distribution q, try its children c_1..c_m in
order: accept c_i with probability min(1, p(c_i) / q(c_i)); on rejection set
p <- normalise(max(p - q, 0)) and q <- q without c_i, renormalised. If all are
rejected, draw the bonus token from p. After an acceptance, go on from c_i's
slot with the target's and the draft's distributions there. Children whose
current q mass is 0 are padding, not draws, and are skipped.

This is lossless when each slot's children are its draws without replacement
from q, in order, their number fixed before they are drawn (``beam``). Step i
(c_i drawn from q_i, residual target p_i) emits x at once with probability
min(p_i(x), q_i(x)); otherwise the later steps face p_{i+1} = residual(p_i, q_i),
whatever c_i was, with c_{i+1} drawn from q_{i+1}, and by induction from the
last step (a draw from p) emit p_{i+1}; in sum p_i(x). An accepted child's own
children were drawn given its token only, so the walk restarts there.
See docs/tree-speculation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_longspec.tree.sampling import BatchSampling
from vllm_longspec.tree.structure import DraftTree


@dataclass(frozen=True)
class Verification:
    accepted_nodes: torch.Tensor  # [B, D] accepted path (node ids, depth 1 first), -1 padded
    emitted_tokens: torch.Tensor  # [B, D + 1] the accepted tokens, then the bonus; -1 padded
    num_emitted: torch.Tensor     # [B] accepted nodes + 1

    @classmethod
    def from_path(cls, tree: DraftTree, accepted_nodes: torch.Tensor,
                  bonus_tokens: torch.Tensor) -> Verification:
        on_path = accepted_nodes >= 0
        num_accepted = on_path.sum(1)
        tokens = tree.tokens.gather(1, accepted_nodes.clamp(min=0)).masked_fill_(~on_path, -1)
        emitted = torch.cat([tokens, tokens.new_full((tree.batch_size, 1), -1)], dim=1)
        emitted.scatter_(1, num_accepted.unsqueeze(1), bonus_tokens.unsqueeze(1))
        return cls(accepted_nodes, emitted, num_accepted + 1)

    @classmethod
    def where(cls, rows: torch.Tensor, chosen: Verification,
              other: Verification) -> Verification:
        """[B] bool: ``chosen``'s result on those rows, ``other``'s elsewhere."""
        def pick(name: str) -> torch.Tensor:
            mine, theirs = getattr(chosen, name), getattr(other, name)
            return torch.where(rows.view(-1, *[1] * (mine.dim() - 1)), mine, theirs)

        return cls(pick("accepted_nodes"), pick("emitted_tokens"), pick("num_emitted"))


@dataclass(frozen=True)
class VerifyNoise:
    """The randomness of a sampled verification, drawn up front."""

    # [B, N] U[0, 1): node i's acceptance test (a node is tried at most once)
    accept: torch.Tensor
    # [B, V] Exp(1): the bonus token is argmax(p / bonus), a draw from p
    bonus: torch.Tensor

    @classmethod
    def draw(cls, sampling: BatchSampling, num_nodes: int, vocab_size: int,
             device: torch.device | str) -> VerifyNoise:
        return cls(sampling.uniforms(num_nodes, device=device),
                   sampling.exponentials(vocab_size, device=device))


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Verification:
    """target_logits: [B, N + 1, V], the target's logits at every slot."""
    target_choice = target_logits.argmax(-1)                              # [B, N + 1]
    matches = tree.tokens == target_choice.gather(1, tree.parents + 1)    # [B, N]
    # a node is on an accepted path iff it and all its ancestors match
    on_path = ~(tree.ancestor_mask & ~matches.unsqueeze(1)).any(-1)       # [B, N]
    accepted_depth = torch.where(on_path, tree.depths, 0)
    deepest = accepted_depth.argmax(1)                                    # first maximum
    any_accepted = on_path.any(1)
    rows = torch.arange(tree.batch_size, device=tree.tokens.device)
    path = tree.ancestor_mask[rows, deepest] & any_accepted.unsqueeze(1)  # [B, N]
    bonus_slot = torch.where(any_accepted, deepest + 1, 0)
    bonus = target_choice.gather(1, bonus_slot.unsqueeze(1)).squeeze(1)
    return Verification.from_path(tree, _by_depth(path, tree), bonus)


def verify_sampling(tree: DraftTree, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    noise: VerifyNoise) -> Verification:
    """Recursive rejection sampling over each slot's children.

    draft_probs: [B, R, V] q at slots 0..R-1; every slot with children needs
    its row (a level-ordered tree may leave out its trailing leaves).
    target_probs: [B, N + 1, V] p at every slot.
    """
    batch = tree.batch_size
    rows = torch.arange(batch, device=tree.tokens.device)
    children = tree.children                                   # [B, N + 1, C]
    last_draft_slot = draft_probs.shape[1] - 1
    slot = torch.zeros(batch, dtype=torch.int64, device=rows.device)
    p = target_probs[:, 0]                                     # [B, V] residual target
    q = draft_probs[:, 0]                                      # [B, V] remaining draft
    walking = torch.ones(batch, dtype=torch.bool, device=rows.device)
    accepted = torch.full((batch, tree.max_depth), -1, dtype=torch.int64, device=rows.device)
    for depth in range(tree.max_depth):
        trying = walking.clone()
        for rank in range(children.shape[-1]):
            child = children[rows, slot, rank]
            token = tree.tokens[rows, child.clamp(min=0)]
            p_token, q_token = p[rows, token], q[rows, token]
            tried = trying & (child >= 0) & (q_token > 0)
            accept = tried & (noise.accept[rows, child.clamp(min=0)] * q_token < p_token)
            reject = (tried & ~accept).unsqueeze(1)
            p, q = (torch.where(reject, residual(p, q), p),  # both from the old p, q
                    torch.where(reject, remove_token(q, token), q))
            accepted[:, depth] = torch.where(accept, child, accepted[:, depth])
            slot = torch.where(accept, child + 1, slot)
            trying &= ~accept
        walking &= ~trying
        moved = walking.unsqueeze(1)
        p = torch.where(moved, target_probs[rows, slot], p)
        # a leaf has no draft row; its q is never read (it has no children)
        q = torch.where(moved, draft_probs[rows, slot.clamp(max=last_draft_slot)], q)
    bonus = (p / noise.bonus).argmax(-1)
    return Verification.from_path(tree, accepted, bonus)


def verify(tree: DraftTree, target_logits: torch.Tensor, sampling: BatchSampling,
           draft_probs: torch.Tensor | None = None) -> Verification:
    """A mixed batch: greedy rows by ``verify_greedy``, the others by
    ``verify_sampling`` on ``sampling``'s target distributions and generators."""
    greedy = sampling.is_greedy
    if bool(greedy.all()):
        return verify_greedy(tree, target_logits)
    if draft_probs is None:
        raise ValueError("sampled rows need the draft distributions their children "
                         "were drawn from")
    noise = VerifyNoise.draw(sampling, tree.num_nodes, target_logits.shape[-1],
                             target_logits.device)
    sampled = verify_sampling(tree, draft_probs, sampling.target_probs(target_logits), noise)
    if not bool(greedy.any()):
        return sampled
    return Verification.where(greedy, verify_greedy(tree, target_logits), sampled)


def first_child_draft_probs(tree: DraftTree, vocab_size: int) -> torch.Tensor:
    """[B, N, V] q for proposals that were not drawn from a known distribution:
    at slots 0..N-1, one-hot on the slot's first child (zeros for a leaf).

    A slot then tries its first child only (accepted with probability p(token);
    after a rejection q has no mass left and the other children count as
    padding). That is lossless for tokens chosen by any rule that does not see
    the verification's randomness: P(emit x) = P(c = x) p(x) + sum over c != x
    of P(c) (1 - p(c)) p(x) / (1 - p(c)) = p(x). A chain's drafts are the
    deterministic proposals of vLLM's rejection sampler without draft probs.
    """
    first_child = tree.children[:, :-1, 0]                 # [B, N]; slot N is a leaf
    tokens = tree.tokens.gather(1, first_child.clamp(min=0))
    one_hot = torch.nn.functional.one_hot(tokens, vocab_size).float()
    return one_hot * (first_child >= 0).unsqueeze(-1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(p - q, 0)) over the last dim; p itself where p <= q everywhere
    (after a rejection only rounding gets there)."""
    excess = (p - q).clamp_(min=0)
    total = excess.sum(-1, keepdim=True)
    return torch.where(total > 0, excess / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def remove_token(q: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """q with ``token`` ([...] ids) at probability 0, renormalised (zeros if none is left)."""
    removed = q.scatter(-1, token.unsqueeze(-1), 0.0)
    return removed / removed.sum(-1, keepdim=True).clamp_(min=torch.finfo(q.dtype).tiny)


def _by_depth(path: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """[B, N] bool nodes of one root path -> [B, D] their ids by depth, -1 padded."""
    depth = tree.max_depth
    slots = torch.where(path, tree.depths - 1, depth)  # column D collects the others
    out = tree.parents.new_full((tree.batch_size, depth + 1), -1)
    nodes = torch.arange(tree.num_nodes, device=path.device).expand_as(slots)
    return out.scatter_(1, slots, nodes)[:, :depth]


def verify_by_target_draws(parents: Sequence[int], tokens: Sequence[int],
                           draw: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """One request's tree verified by the target's own draws.

    ``draw(slot)`` samples the target's token at a slot (0: the root, i + 1:
    node i) and must be called in order, one draw per emitted token, as plain
    decoding samples. Starting at the root, the walk draws the slot's token; a
    child holding it is accepted and the walk moves there, else the drawn token
    is the bonus and the walk ends. Returns (emitted tokens: the accepted ones
    then the bonus, accepted node ids by depth).

    Each emitted token is the target's own sample given the tokens before it,
    whatever was drafted, so the output is plain decoding's token for token
    when ``draw`` is plain decoding's sampler with its random stream: the drafts
    only decide how many of those tokens one step emits. A child proposed by a
    rule that does not see the draw is accepted with probability p(token), as
    a deterministic proposal is under rejection sampling.
    """
    children: dict[tuple[int, int], int] = {}
    for node, (parent, token) in enumerate(zip(parents, tokens, strict=True)):
        children.setdefault((parent, token), node)  # a repeated token: the first
    emitted: list[int] = []
    path: list[int] = []
    node = -1
    while True:
        token = draw(node + 1)
        emitted.append(token)
        child = children.get((node, token))
        if child is None:
            return emitted, path
        path.append(child)
        node = child
