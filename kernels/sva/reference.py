"""Plain-PyTorch SVA loss, written for clarity: the oracle for every kernel in this package.

Nothing here is fast or memory-frugal: full [N, V] float32 copies, a full sort per row, python
loops over samples and domains. See ``../shared/DESIGN.md`` §4 for the maths.
"""
from __future__ import annotations

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def salient_set_reference(teacher_logits: torch.Tensor, topk: int, vocab_size: int | None = None):
    """Indices [N, k] (int64) of the teacher's top-k over ``[0, vocab_size)``, ties to the lower id.

    A stable descending sort keeps equal values in index order, so the lower id comes first.
    """
    t = _f32(teacher_logits)
    if vocab_size is not None:
        t = t[:, :vocab_size]
    order = torch.sort(t, dim=-1, descending=True, stable=True).indices
    return order[:, :topk]


def sva_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    topk: int,
    *,
    vocab_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position reverse KL on the teacher's top-k set, both sides renormalised on it.

    student_logits, teacher_logits: [N, V]. Returns [N] float32; rows with ``mask == 0`` give 0.
    Convention: a salient entry where the renormalised student probability is 0 contributes 0
    (``0 * log 0 = 0``); one where the teacher's is 0 but the student's is not gives +inf; a row
    whose student logits on S are all -inf gives 0.
    """
    idx = salient_set_reference(teacher_logits, topk, vocab_size)
    s = torch.gather(_f32(student_logits), 1, idx)
    t = torch.gather(_f32(teacher_logits), 1, idx).detach()
    dead = (s == float("-inf")).all(-1, keepdim=True)  # no student mass on S: loss 0
    s = torch.where(dead, torch.zeros_like(s), s)
    log_ps = torch.log_softmax(s, dim=-1)  # log p̄_s: renormalised on S only
    log_pt = torch.log_softmax(t, dim=-1)  # log p̄_t
    ps = torch.where(dead, torch.zeros_like(log_ps), log_ps.exp())
    support = ps > 0
    # Safe where: the unselected branch must be finite, or autograd turns 0 * inf into nan.
    diff = torch.where(support, log_ps - log_pt, torch.zeros_like(ps))
    loss = (ps * diff).sum(-1)
    if mask is not None:
        loss = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    return loss


def fused_linear_sva_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    topk: int,
    *,
    vocab_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sva_loss_reference`` of the two LM heads' full logits ([T, H] @ [V, H]^T)."""
    student_logits = student_hidden @ student_weight.t()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.t()
    return sva_loss_reference(student_logits, teacher_logits, topk, vocab_size=vocab_size, mask=mask)


def domain_normalized_reference(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    sample_index: torch.Tensor,
    sample_domain: torch.Tensor,
) -> torch.Tensor:
    """Mean over domains present of (mean over that domain's samples of (mean over response tokens)).

    token_loss [T], response_mask [T], sample_index [T] (sample of each token, in
    ``[0, len(sample_domain))``), sample_domain [S]. A sample with no response token is not
    counted; a domain with no counted sample is not present.
    """
    per_domain: dict[int, list[torch.Tensor]] = {}
    for i in range(sample_domain.numel()):
        sel = (sample_index == i) & response_mask.bool()
        if sel.any():
            per_domain.setdefault(int(sample_domain[i]), []).append(token_loss[sel].mean())
    if not per_domain:
        return token_loss.sum() * 0.0
    domain_means = [torch.stack(v).mean() for v in per_domain.values()]
    return torch.stack(domain_means).mean()
