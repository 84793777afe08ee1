"""LM-head loss in row chunks: never materialises [rows, vocab] logits at once.

For the draft's final hidden states h (the rows that carry a loss), the frozen
LM head W [V, hidden] (the draft vocabulary's rows of the target's head, see
vocab_map.py; V = the whole vocabulary without one) and per-row weights w
(1 / loss tokens in the step):

    loss = sum_r w_r * ((1 - a) * CE(W h_r, label_r) + a * KL(p_teacher,r || p_draft,r))

with a = distill_weight. Labels are head rows; -1 (a token the draft cannot
propose) drops that row's CE term. The teacher is either the target's final
hidden g_r (p_teacher = softmax(W g_r): the target restricted to the head's
rows, renormalised) or its top-k logits with their head rows (p_teacher =
softmax over the entries whose row is >= 0; a row with none has no KL term).

The forward pass walks the rows ``chunk_rows`` at a time, computing the loss
AND its gradient w.r.t. h (d loss / d logits = w_r (c_r softmax_draft -
(1-a) onehot(label) - a p_teacher), c_r the weight of the row's terms);
backward only scales the stored gradient. This is a fused linear +
cross-entropy (as Liger's, used by the reference code): one chunk of logits
alive at any time and no recomputation. W gets no gradient.

Logits are computed in W's dtype (bfloat16 for a bfloat16 target), softmax and
the loss in float32.
"""

from __future__ import annotations

import dataclasses

import torch

# stats = [sum CE, sum KL, correct top-1, rows, rows whose label is outside the head]
NUM_STATS = 5


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The distillation target for the loss rows: one of the two forms."""

    final_hidden: torch.Tensor | None = None  # [rows, hidden] target's final hidden
    top_k_logits: torch.Tensor | None = None  # [rows, k] the target's k largest logits
    top_k_rows: torch.Tensor | None = None  # [rows, k] their head rows, -1 outside

    def __post_init__(self) -> None:
        has_logits, has_rows = self.top_k_logits is not None, self.top_k_rows is not None
        if has_logits != has_rows or has_logits == (self.final_hidden is not None):
            raise ValueError("a Teacher is final_hidden, or top_k_logits with top_k_rows.")


def _teacher_terms(
    teacher: Teacher, rows: slice, weight: torch.Tensor, log_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kl [chunk], has_kl [chunk] float, p dense [chunk, V] or p sparse [chunk, k],
    sparse head rows [chunk, k] or None)."""
    if teacher.final_hidden is not None:
        # [chunk, V]
        target_logits = teacher.final_hidden[rows].to(weight.dtype) @ weight.T
        target_log_probs = torch.log_softmax(target_logits.float(), dim=-1)
        del target_logits
        target_probs = target_log_probs.exp()
        kl = target_log_probs.sub_(log_probs).mul_(target_probs).sum(-1)
        return kl, torch.ones_like(kl), target_probs, None
    # [chunk, k]
    head_rows = teacher.top_k_rows[rows]
    in_head = head_rows >= 0
    logits = teacher.top_k_logits[rows].float().masked_fill(~in_head, float("-inf"))
    has_kl = in_head.any(-1)
    target_log_probs = torch.log_softmax(logits, dim=-1).masked_fill(~in_head, 0.0)
    target_probs = target_log_probs.exp() * in_head
    safe_rows = head_rows.clamp(min=0)
    draft_log_probs = log_probs.gather(1, safe_rows)
    kl = ((target_log_probs - draft_log_probs) * target_probs).sum(-1)
    return kl, has_kl.float(), target_probs, safe_rows


class ChunkedLMHeadLoss(torch.autograd.Function):
    """loss, stats = apply(hidden, lm_head_weight, labels, row_weights, teacher,
    distill_weight, chunk_rows); stats [NUM_STATS] are unweighted, for logging."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [rows, hidden]
        lm_head_weight: torch.Tensor,  # [V, hidden], frozen
        labels: torch.Tensor,  # [rows] head rows, -1 outside the head
        row_weights: torch.Tensor,  # [rows] float
        teacher: Teacher | None,
        distill_weight: float,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = torch.zeros(NUM_STATS, dtype=torch.float64, device=hidden.device)
        weight = lm_head_weight
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                label = labels[rows]
                in_head = label >= 0
                safe_label = label.clamp(min=0)
                # [chunk, V] in W's dtype, then float32 log-probabilities
                logits = hidden[rows].to(weight.dtype) @ weight.T
                log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                del logits
                # [chunk]
                ce = -log_probs.gather(1, safe_label[:, None]).squeeze(1) * in_head
                ce_weight = (1.0 - distill_weight) * in_head.float()
                row_loss = ce_weight * ce
                stats[0] += ce.sum().double()
                stats[2] += (log_probs.argmax(-1) == label).sum()
                stats[4] += (~in_head).sum()
                draft_weight = ce_weight  # weight of softmax_draft in the gradient
                if distill_weight > 0:
                    kl, has_kl, target_probs, sparse_rows = _teacher_terms(
                        teacher, rows, weight, log_probs)
                    kl_weight = distill_weight * has_kl
                    draft_weight = ce_weight + kl_weight
                    row_loss = row_loss + kl_weight * kl
                    stats[1] += kl.sum().double()
                row_weight = row_weights[rows].float()
                loss += (row_weight * row_loss).sum()
                if not needs_grad:
                    continue
                # d loss / d logits = w_r (c_r softmax_draft - (1-a) onehot(label)
                # - a p_teacher), written over log_probs (no longer needed): [chunk, V]
                grad_logits = log_probs.exp_().mul_((row_weight * draft_weight)[:, None])
                grad_logits.scatter_add_(1, safe_label[:, None],
                                         -(row_weight * ce_weight)[:, None])
                if distill_weight > 0:
                    teacher_weight = (distill_weight * row_weight)[:, None]
                    if sparse_rows is None:
                        grad_logits.sub_(target_probs.mul_(teacher_weight))
                    else:
                        grad_logits.scatter_add_(1, sparse_rows,
                                                 -teacher_weight * target_probs)
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        stats[3] = hidden.shape[0]
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss, None, None, None, None, None, None


def chunked_lm_head_loss(
    hidden: torch.Tensor,  # [rows, hidden]
    lm_head_weight: torch.Tensor,  # [V, hidden]
    labels: torch.Tensor,  # [rows] head rows, -1 outside the head
    row_weights: torch.Tensor,  # [rows]
    target_hidden: torch.Tensor | None = None,  # [rows, hidden]
    distill_weight: float = 0.0,
    chunk_rows: int = 256,
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar, stats [NUM_STATS]) — see ``ChunkedLMHeadLoss``.

    The teacher is ``teacher``, or ``target_hidden`` as a full teacher.
    """
    if teacher is None and target_hidden is not None:
        teacher = Teacher(final_hidden=target_hidden)
    if distill_weight > 0 and teacher is None:
        raise ValueError("distillation needs a teacher: the target's final hidden "
                         "states or its top-k logits.")
    return ChunkedLMHeadLoss.apply(
        hidden, lm_head_weight.detach(), labels, row_weights, teacher,
        float(distill_weight), int(chunk_rows),
    )
