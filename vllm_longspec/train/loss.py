"""LM-head loss in row chunks: never materialises [rows, vocab] logits at once.

For the draft's final hidden states h (the rows that carry a loss), the frozen
LM head W [vocab, hidden] and per-row weights w (mask / tokens in the step):

    loss = sum_r w_r * ((1 - a) * CE(W h_r, label_r) + a * KL(p_target,r || p_draft,r))

with a = distill_weight and p_target,r = softmax(W g_r) from the target's final
hidden g_r. The forward pass walks the rows ``chunk_rows`` at a time, computing
the loss AND its gradient w.r.t. h (d loss / d logits = w_r (softmax_draft -
(1-a) onehot(label) - a p_target)); backward only scales the stored gradient.
This is a fused linear + cross-entropy (as Liger's, used by the reference code):
one chunk of logits alive at any time and no recomputation. W gets no gradient.

Logits are computed in W's dtype (bfloat16 for a bfloat16 target), softmax and
the loss in float32.
"""

from __future__ import annotations

import torch


class ChunkedLMHeadLoss(torch.autograd.Function):
    """loss, stats = apply(hidden, lm_head_weight, labels, row_weights,
    target_hidden, distill_weight, chunk_rows)

    stats = [sum CE, sum KL, correct top-1, rows] (unweighted, for logging).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [rows, hidden]
        lm_head_weight: torch.Tensor,  # [vocab, hidden], frozen
        labels: torch.Tensor,  # [rows] int
        row_weights: torch.Tensor,  # [rows] float
        target_hidden: torch.Tensor | None,  # [rows, hidden] or None
        distill_weight: float,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = torch.zeros(4, dtype=torch.float64, device=hidden.device)
        weight = lm_head_weight
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                label = labels[rows]
                # [chunk, vocab]
                logits = (hidden[rows].to(weight.dtype) @ weight.T).float()
                log_probs = torch.log_softmax(logits, dim=-1)
                del logits
                # [chunk]
                ce = -log_probs.gather(1, label[:, None]).squeeze(1)
                row_loss = (1.0 - distill_weight) * ce
                stats[0] += ce.sum().double()
                stats[2] += (log_probs.argmax(-1) == label).sum()
                # d loss_r / d logits_r, before the row weight: [chunk, vocab]
                grad_logits = log_probs.exp()
                grad_logits.scatter_add_(
                    1, label[:, None],
                    torch.full_like(ce[:, None], -(1.0 - distill_weight)),
                )
                if distill_weight > 0:
                    # [chunk, vocab] target log-probs, then p_target
                    target_logits = target_hidden[rows].to(weight.dtype) @ weight.T
                    target_log_probs = torch.log_softmax(target_logits.float(), dim=-1)
                    del target_logits
                    target_probs = target_log_probs.exp()
                    grad_logits.add_(target_probs, alpha=-distill_weight)
                    # KL = sum p_t (log p_t - log p_d), reusing target_log_probs
                    kl = target_log_probs.sub_(log_probs).mul_(target_probs).sum(-1)
                    row_loss = row_loss + distill_weight * kl
                    stats[1] += kl.sum().double()
                row_weight = row_weights[rows].float()
                loss += (row_weight * row_loss).sum()
                if needs_grad:
                    grad_logits *= row_weight[:, None]
                    grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(
                        hidden.dtype
                    )
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
    lm_head_weight: torch.Tensor,  # [vocab, hidden]
    labels: torch.Tensor,  # [rows]
    row_weights: torch.Tensor,  # [rows]
    target_hidden: torch.Tensor | None = None,  # [rows, hidden]
    distill_weight: float = 0.0,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar, stats [4]) — see ``ChunkedLMHeadLoss``."""
    if distill_weight > 0 and target_hidden is None:
        raise ValueError("distillation needs the target's final hidden states.")
    return ChunkedLMHeadLoss.apply(
        hidden, lm_head_weight.detach(), labels, row_weights, target_hidden,
        float(distill_weight), int(chunk_rows),
    )
