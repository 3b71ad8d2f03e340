"""SVA from a precomputed teacher top-k: ``sva_from_topk`` (plain PyTorch, no Triton).

For a teacher that does not fit beside the student, the salient set S (the teacher's top-k ids)
and the teacher's logits on S are computed offline (``tools/precompute_teacher_topk.py``). The
loss then needs only the student's logits on S, ``z_s[t, j] = h[t] · W_s[ids[t, j]]`` — k dot
products per position, never a [T, V] matmul — and the same renormalised reverse KL as
``reference.sva_loss_reference`` on those [T, k] values (DESIGN.md §4).

:class:`_LogitsOnSet` is the one autograd Function: it gathers the LM-head rows of S in
sub-chunks and saves only the ids, so backward is the sparse ``∂h[t] = Σ_j g_tj W_s[ids_tj]``,
``∂W_s[ids_tj] += g_tj h[t]`` (as in ``fused_linear.py``). The loss on [T, k] is plain autograd.

Vocab-parallel (``tp_group``, megatron-core's contiguous layout: rank r holds ids
[r·V_local, (r+1)·V_local)): each rank computes the dot products of the ids it owns (0 elsewhere),
one all-reduce (sum) of [T, k] completes them, so every rank holds the full loss. Backward writes
each rank's own shard of ``∂W_s``; the partial ``∂h`` is summed over the group
(``reduce_hidden_grad``), what megatron-core's copy-to-tensor-parallel-region does.
"""
from __future__ import annotations

import os

import torch

from .fused_linear import _student_on_set, _sub_chunk, set_logits_backward
from .reference import salient_set_reference
from .sva import check_topk, complete_student, decode_keys, global_topk_keys, \
    shard_layout, sva_topk_keys


def teacher_topk(
    teacher_logits: torch.Tensor,
    topk: int,
    *,
    vocab_size: int | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The salient set of each row: (global ids [N, k] int64, teacher logits there [N, k] fp32).

    teacher_logits: [N, V_local] (this rank's vocab shard with ``tp_group``). Descending by
    value, ties to the lower id, ids ≥ ``vocab_size`` (padded rows) never chosen: the rule of
    the fused kernel, whose streaming top-k (and vocab-parallel exchange) runs here on a GPU or
    under ``TRITON_INTERPRET=1`` (the OPD stage's rule for its fused path); elsewhere a stable
    full sort (the reference), one rank only.
    Every rank of ``tp_group`` gets the same result.
    """
    check_topk(topk, teacher_logits.shape[1], vocab_size, tp_group)
    if teacher_logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        offset, n_valid = shard_layout(teacher_logits.shape[1], vocab_size, tp_group)
        rows = torch.arange(teacher_logits.shape[0], dtype=torch.int32,
                            device=teacher_logits.device)
        keys = sva_topk_keys(teacher_logits.contiguous(), rows, topk, n_valid, offset)
        values, ids = decode_keys(global_topk_keys(keys, topk, tp_group))
        return ids, values
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        raise NotImplementedError("a vocab-parallel teacher top-k needs the Triton kernel (a GPU, "
                                  "or TRITON_INTERPRET=1 on CPU)")
    ids = salient_set_reference(teacher_logits, topk, vocab_size)
    values = torch.gather(teacher_logits.float(), 1, ids)
    return ids, values


class _LogitsOnSet(torch.autograd.Function):
    """[T, k] fp32 ``h[t] · W[ids[t, j]]`` over the vocab-parallel group, sparse backward."""

    @staticmethod
    def forward(ctx, hidden, weight, local, owned, sub, tp_group, reduce_hidden_grad):
        z = complete_student(_student_on_set(hidden, weight, local, sub), owned, tp_group)
        ctx.save_for_backward(hidden, weight, local, owned)
        ctx.sub, ctx.tp_group, ctx.reduce_hidden_grad = sub, tp_group, reduce_hidden_grad
        return z

    @staticmethod
    def backward(ctx, grad_z):
        h, w, local, owned = ctx.saved_tensors
        g = torch.where(owned, grad_z.float(), 0.0)  # [T, k]: only the ids this rank owns
        rows = torch.arange(h.shape[0], device=h.device)
        grad_h, grad_w = set_logits_backward(g, h, w, rows, local, ctx)
        return grad_h, grad_w, None, None, None, None, None


def set_loss(student_on_set: torch.Tensor, teacher_on_set: torch.Tensor) -> torch.Tensor:
    """[R] reverse KL on S from [R, k] student/teacher logits, both renormalised on S.

    The conventions of ``reference.sva_loss_reference``: a salient entry with zero student
    probability contributes 0, a row whose student logits are all -inf gives 0.
    """
    s, t = student_on_set.float(), teacher_on_set.float().detach()
    dead = (s == float("-inf")).all(-1, keepdim=True)
    s = torch.where(dead, torch.zeros_like(s), s)
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    ps = torch.where(dead, torch.zeros_like(log_ps), log_ps.exp())
    support = ps > 0
    diff = torch.where(support, log_ps - log_pt, torch.zeros_like(ps))
    return (ps * diff).sum(-1)


def sva_from_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: torch.distributed.ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """SVA loss per position from the teacher's precomputed salient set (its top-k).

    Equal to ``fused_linear_sva_reference(student_hidden, student_weight, h_t, w_t, k)`` when
    ``teacher_ids``/``teacher_logits`` are the teacher's top-k ids (ties to the lower id, padded
    rows excluded) and its logits there. Only the student's logits on those ids are computed.

    Args:
        student_hidden: [R, H] the student's final-norm hidden states at the R positions to score
            (select them first: ``h[rows]``); fp32/bf16/fp16. Differentiable.
        student_weight: [V_local, H] the student's output layer (this rank's vocab shard).
            Differentiable; backward writes only the rows of S.
        teacher_ids: [R, k] int32/int64 global token ids of S per position (any order, no
            repeats; every id < V_local · tp).
        teacher_logits: [R, k] the teacher's logits at those ids (any float dtype; log-probs work
            too: only differences within a row matter). Gets no gradient.
        tp_group: tensor-parallel group when ``student_weight`` is a vocab-parallel shard; the
            hidden states are then the full, replicated ones. Every rank returns the full loss.
        reduce_hidden_grad: with ``tp_group``, all-reduce the hidden gradient over it (set False
            when the caller's own region does it, e.g. sequence parallelism's gather).
        chunk_size: bounds the gathered [rows, k, H] LM-head rows to ~chunk_size · V_local values.

    Returns:
        [R] float32 loss per position.
    """
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError("student_hidden must be [R, H] and student_weight [V_local, H], got "
                         f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}")
    if student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError("student_hidden [R, H] and student_weight [V_local, H] disagree on H")
    if teacher_ids.dim() != 2 or teacher_ids.shape != teacher_logits.shape \
            or teacher_ids.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [R={student_hidden.shape[0]}"
                         ", k]")
    if teacher_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_ids must be int32/int64, got {teacher_ids.dtype}")
    v_local, hidden = student_weight.shape
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    ids = teacher_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v_local * world):
        raise ValueError(f"teacher_ids must be in [0, {v_local * world}) (the LM head's rows)")
    local = ids - rank * v_local
    owned = (local >= 0) & (local < v_local)
    local = local.clamp(0, v_local - 1)
    sub = _sub_chunk(chunk_size, v_local, max(1, ids.shape[1]), hidden)
    z = _LogitsOnSet.apply(student_hidden, student_weight, local, owned, sub, tp_group,
                           reduce_hidden_grad)
    return set_loss(z, teacher_logits.to(student_hidden.device))
