"""SVA fused with the LM heads: ``fused_linear_sva`` — chunked over tokens, sparse backward.

Forward, per chunk of (response) tokens: teacher logits ``h_t @ W_t^T`` for the chunk only
([C, V_local], the one full-width tensor alive at a time) → streaming top-k kernel → global
salient set (vocab-parallel exchange as in ``sva.py``) → the student's logits are needed on S
only, so they are k dot products per token (``W_s[S] · h_s``), never a [C, V] matmul → loss and
the coefficients ``c = ∂ℓ/∂z_s`` on S ([C, k], saved).

Backward from the saved [R, k] ids and coefficients alone (no recompute, no teacher, no logits):
``∂h_s[t] = Σ_u g_t c_tu W_s[u]`` and ``∂W_s[u] += g_t c_tu h_s[t]`` — O(R·k·H) instead of the
O(R·V·H) of a dense logits gradient. Those gathers run in sub-chunks no larger than a logits chunk.
"""
from __future__ import annotations

import torch

from .sva import active_rows, check_topk, complete_student, salient_set, sva_set_loss


def _sub_chunk(chunk: int, v_local: int, topk: int, hidden: int) -> int:
    """Rows per gather so that [rows, k, H] never exceeds one [chunk, V_local] logits chunk."""
    return max(1, min(chunk, (chunk * v_local) // max(1, topk * hidden)))


def _student_on_set(h: torch.Tensor, w: torch.Tensor, local: torch.Tensor, sub: int) -> torch.Tensor:
    """[C, k] student logits ``w[local[c, j]] · h[c]`` (in the weight dtype, like ``h @ w.T``)."""
    out = torch.empty(local.shape, dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], sub):
        w_set = w[local[i:i + sub]]  # [c, k, H]
        out[i:i + sub] = torch.bmm(w_set, h[i:i + sub, :, None].to(w.dtype)).squeeze(-1).float()
    return out


class FusedLinearSVAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, topk,
                chunk_size, vocab_size, tp_group, mask, reduce_hidden_grad):
        n_tokens, hidden = student_hidden.shape
        v_local = student_weight.shape[0]
        rows = active_rows(mask, n_tokens, student_hidden.device).long()
        sub = _sub_chunk(chunk_size, v_local, topk, hidden)
        loss = torch.zeros((n_tokens,), dtype=torch.float32, device=student_hidden.device)
        local_all = torch.empty((rows.numel(), topk), dtype=torch.int32, device=rows.device)
        coef_all = torch.empty((rows.numel(), topk), dtype=torch.float32, device=rows.device)
        with torch.no_grad():
            for c0, r in row_chunks(rows, chunk_size):
                teacher_logits = teacher_hidden[r] @ teacher_weight.t()  # [C, V_local]
                all_rows = torch.arange(r.numel(), dtype=torch.int32, device=r.device)
                t_on_set, local, owned = salient_set(teacher_logits, all_rows, topk, vocab_size,
                                                     tp_group)
                del teacher_logits
                s_on_set = _student_on_set(student_hidden[r], student_weight, local, sub)
                s_on_set = complete_student(s_on_set, owned, tp_group)
                loss_c, coef = sva_set_loss(s_on_set, t_on_set)
                loss[r] = loss_c
                local_all[c0:c0 + chunk_size] = local.to(torch.int32)
                coef_all[c0:c0 + chunk_size] = torch.where(owned, coef, 0.0)
        ctx.save_for_backward(student_hidden, student_weight, rows, local_all, coef_all)
        ctx.sub, ctx.tp_group, ctx.reduce_hidden_grad = sub, tp_group, reduce_hidden_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, rows, local_all, coef_all = ctx.saved_tensors
        gc = grad_loss.float()[rows, None] * coef_all  # [R, k] = ∂L/∂z_s on S
        grad_h, grad_w = set_logits_backward(gc, h, w, rows, local_all, ctx)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def set_logits_backward(g, h, w, rows, local, ctx):
    """Sparse backward of ``z[r, j] = h[rows[r]] · w[local[r, j]]`` given ``g = ∂L/∂z`` [R, k].

    Only the k gathered LM-head rows per position get a gradient (``index_add_``, fp32, cast to
    ``w``'s dtype); the hidden gradient is all-reduced over ``ctx.tp_group`` when
    ``ctx.reduce_hidden_grad`` (each rank only sees its vocab shard's part). ``ctx`` also gives
    ``sub`` (positions per chunk) and ``needs_input_grad`` for (h, w).
    """
    grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
    grad_w = (torch.zeros(w.shape, dtype=torch.float32, device=w.device)
              if ctx.needs_input_grad[1] else None)
    for i in range(0, rows.numel(), ctx.sub):
        r, ids, gi = rows[i:i + ctx.sub], local[i:i + ctx.sub].long(), g[i:i + ctx.sub]
        if grad_h is not None:
            w_set = w[ids]  # [c, k, H]
            grad_h[r] = torch.bmm(gi[:, None, :].to(w.dtype), w_set).squeeze(1).to(h.dtype)
        if grad_w is not None:
            contrib = gi[:, :, None] * h[r].float()[:, None, :]  # [c, k, H]
            grad_w.index_add_(0, ids.flatten(), contrib.reshape(-1, h.shape[1]))
    if grad_h is not None and ctx.reduce_hidden_grad:
        sum_over_tp(grad_h, ctx.tp_group)
    return grad_h, None if grad_w is None else grad_w.to(w.dtype)


# The chunk machinery every fused LM-head loss shares (this one and a1_kernels.cross_entropy).
def row_chunks(rows: torch.Tensor, chunk_size: int):
    """``(start, rows[start:start + chunk_size])`` over the active rows [R]: a loss's token
    chunks, each the only [chunk, V_local] logits alive at a time."""
    for c0 in range(0, rows.numel(), chunk_size):
        yield c0, rows[c0:c0 + chunk_size]


def sum_over_tp(grad_h: torch.Tensor, tp_group) -> None:
    """In place, sum the hidden-state gradient over the vocab-parallel group: each rank's head
    only sees its vocabulary shard's part (megatron-core's copy-to-tensor-parallel-region does
    this in backward; a sequence-parallel gather's reduce-scatter does it instead)."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(grad_h, group=tp_group)


def fused_linear_sva(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    topk: int,
    chunk_size: int = 4096,
    *,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """SVA loss per token straight from hidden states and LM-head weights (what the trainer calls).

    Equal to ``sva_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)``
    but never holds more than one [chunk_size, V_local] chunk of (teacher) logits; the student's
    logits exist only on the k salient ids.

    Args:
        student_hidden: [T, H] packed (THD) tokens of the student's final norm output; fp32/bf16/fp16.
        student_weight: [V_local, H] the student's output layer (this rank's vocab shard).
        teacher_hidden: [T, H'] the teacher's final hidden states for the same tokens (no grad).
        teacher_weight: [V_local, H'] the teacher's output layer shard (no grad).
        topk: salient-set size k.
        chunk_size: tokens per chunk; peak extra memory ~ chunk_size·V_local teacher logits.
        mask: [T] response mask (bool/int). Tokens with 0 are never computed: loss 0, grad 0.
        vocab_size: real vocabulary size (ids ≥ it, the padded rows, are never salient).
        tp_group: tensor-parallel group when the weights are megatron-core vocab-parallel shards
            (rank r holds ids [r·V_local, (r+1)·V_local)); hidden states are the full
            (replicated) ones. Every rank returns the full loss; ``student_weight`` gets its
            shard's gradient.
        reduce_hidden_grad: with ``tp_group``, all-reduce the hidden gradient over it so each
            rank gets the full one (what megatron-core's copy-to-tensor-parallel-region does in
            backward). Set False if the caller's own region already does that reduction.

    Returns:
        [T] float32 per-token loss (0 where ``mask`` is 0). Gradients flow to ``student_hidden``
        and ``student_weight`` only.

    Example (the stage-3 trainer)::

        tok_loss = fused_linear_sva(h_s, w_s, h_t, w_t, topk=64, mask=response_mask,
                                    vocab_size=248_077, tp_group=tp)
        out = domain_normalized_loss(tok_loss, response_mask, sample_index, sample_domain,
                                     num_domains=4, dp_group=dp)
        out.loss.backward()   # log out.value
    """
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError("student_hidden and teacher_hidden must have the same number of tokens")
    if student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError("student_hidden [T, H] and student_weight [V_local, H] disagree on H")
    if teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError("teacher_hidden [T, H'] and teacher_weight [V_local, H'] disagree on H'")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError("student and teacher weights must be shards of the same vocabulary")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_topk(topk, student_weight.shape[0], vocab_size, tp_group)
    return FusedLinearSVAFunction.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                        teacher_weight.detach(), topk, chunk_size, vocab_size,
                                        tp_group, mask, reduce_hidden_grad)
