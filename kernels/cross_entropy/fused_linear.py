"""Cross-entropy fused with the output layer: ``fused_linear_cross_entropy``, chunked over tokens.

Forward, per chunk of labelled tokens: logits ``hidden[chunk] @ weight.T`` ([C, V_local], the one
full-width tensor alive) → ``chunk_stats`` (max, Σ exp, target logit per row) → with tensor
parallelism the max is all-reduced (MAX) and the rescaled sums and target logits (SUM), as in
megatron-core's ``vocab_parallel_cross_entropy`` → ``lse`` and the loss. Only ``lse`` [R] fp32 is
kept for backward.

Backward recomputes each chunk's logits, turns them in place into ``g · (softmax − onehot)``
(``chunk_grad_``) and accumulates ``∂hidden = dz @ W`` and ``∂W += dzᵀ @ hidden[chunk]``.

Why recompute instead of Liger-Kernel's gradients-in-forward: the output is a *per-token* loss
whose upstream gradient ``g`` (the loss mask, the per-token normalisation, the loss scale) is only
known in backward, and ``∂W = Σ_t g_t dz_tᵀ h_t`` mixes tokens, so it cannot be formed before ``g``
exists. Recomputing costs one more [C, H]×[H, V_local] matmul per chunk (four instead of three:
≈ +5% of a 35B-A3B step's FLOPs, whose head is ~1/6 of the forward) and keeps the contract of
an ordinary autograd function (any ``g``, forward-only calls pay nothing for gradients).

Memory beyond the inputs (C = ``chunk_size``, R = labelled tokens), Triton path:
  forward   one [C, V_local] logits chunk (input dtype); lse, rows, targets: O(R)
  backward  one [C, V_local] chunk; ∂hidden [N, H]; ∂W [V_local, H] — accumulated in fp32 over
            chunks for bf16/fp16 inputs (plus one [V_local, H] product in the input dtype per
            chunk), directly for fp32 or a single chunk
so the peak grows with the chunk, never with N × V. The PyTorch chunk functions add one fp32
[C, V_local] temporary in forward (two more for bf16/fp16 chunks in backward).

Where the kernels run: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, go through the
Triton kernels (``kernels.py``); other CPU tensors through the same chunk loop with the
plain-PyTorch chunk functions of ``reference.py`` (same contract, fp32 copies of one chunk).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..sva.fused_linear import row_chunks, sum_over_tp
from .kernels import SUPPORTED_DTYPES, chunk_grad_, chunk_stats, interpreting
from .reference import chunk_grad_reference_, chunk_stats_reference


def _tp(tp_group):
    return tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None


def _combine(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tp_group):
    """Per-shard (max, Σ exp(z − max), target logit) → (lse, target logit) over the vocabulary."""
    if tp_group is not None:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
        shift = torch.where(m_all == float("-inf"), torch.zeros_like(m_all), m_all)
        st = torch.stack([s * torch.exp(m - shift), t])
        dist.all_reduce(st, group=tp_group)
        m, s, t = m_all, st[0], st[1]
    return m + torch.log(s), t


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, rows, target, chunk_size, tp_group, reduce_hidden_grad,
                use_triton):
        stats = chunk_stats if use_triton else chunk_stats_reference
        dense = rows.numel() == hidden.shape[0]  # no ignored token: chunks are plain slices
        loss = torch.zeros((hidden.shape[0],), dtype=torch.float32, device=hidden.device)
        lse = torch.empty((rows.numel(),), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for c0, r in row_chunks(rows, chunk_size):
                h = hidden[c0:c0 + r.numel()] if dense else hidden.index_select(0, r)
                logits = h @ weight.t()  # [C, V_local]
                m, s, t = stats(logits, target[c0:c0 + r.numel()])
                del logits
                lse_c, t = _combine(m, s, t, tp_group)
                lse[c0:c0 + r.numel()] = lse_c
                loss.index_put_((r,), lse_c - t)
        ctx.save_for_backward(hidden, weight, rows, target, lse)
        ctx.chunk_size, ctx.tp_group = chunk_size, tp_group
        ctx.reduce_hidden_grad, ctx.use_triton = reduce_hidden_grad, use_triton
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, target, lse = ctx.saved_tensors
        grad_ = chunk_grad_ if ctx.use_triton else chunk_grad_reference_
        dense = rows.numel() == hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.float().index_select(0, rows).contiguous()
        grad_h = (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                  if want_h else None)  # contiguous: chunks of it are matmul outputs
        n_chunks = -(-rows.numel() // ctx.chunk_size)
        # fp32 accumulator over chunks unless the weight already is fp32 or one chunk suffices
        direct = weight.dtype == torch.float32 or n_chunks <= 1
        grad_w = None
        if want_w:
            grad_w = torch.zeros(weight.shape, dtype=weight.dtype if direct else torch.float32,
                                 device=weight.device)
        for c0, r in row_chunks(rows, ctx.chunk_size):
            c1 = c0 + r.numel()
            h = hidden[c0:c1] if dense else hidden.index_select(0, r)
            dz = h @ weight.t()  # recomputed [C, V_local] logits, then their gradient in place
            grad_(dz, target[c0:c1], lse[c0:c1], g[c0:c1])
            if grad_h is not None:
                if dense:
                    torch.mm(dz, weight, out=grad_h[c0:c1])
                else:
                    grad_h.index_copy_(0, r, dz @ weight)
            if grad_w is not None:
                if direct:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w += dz.t() @ h
            del dz
        if grad_h is not None and ctx.reduce_hidden_grad:
            sum_over_tp(grad_h, ctx.tp_group)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 4096,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """Per-token cross-entropy of the output layer ``hidden @ weight.T``, never holding more
    than ``chunk_size`` rows of logits.

    Equal to megatron-core's output layer (``ColumnParallelLinear``) followed by
    ``tensor_parallel.vocab_parallel_cross_entropy``, in values and in the gradients of
    ``hidden`` and ``weight``.

    Args:
        hidden: [N, H] packed (THD) final-norm hidden states, fp32/bf16/fp16. With sequence
            parallelism, the gathered full sequence (``megatron_a1.training.opd.final_hidden``:
            megatron-core's gather, whose backward reduce-scatters) and
            ``reduce_hidden_grad=False``.
        weight: [V_local, H] the output layer's weight (this rank's vocabulary shard under TP:
            rank r holds ids [r·V_local, (r+1)·V_local)), same dtype as ``hidden``.
        labels: [N] int target ids in [0, V_local·tp), or ``ignore_index``.
        chunk_size: labelled tokens per chunk; extra memory ~ chunk_size·V_local logits.
        tp_group: the tensor-parallel group when ``weight`` is a vocabulary shard (None: one
            rank). Every rank returns the full per-token loss.
        ignore_index: label of tokens without a loss (never computed: loss 0, gradient 0).
        reduce_hidden_grad: with ``tp_group``, sum ``hidden``'s gradient over the group (what
            the output layer's input mapping does without sequence parallelism). False when the
            caller's sequence-parallel gather already does it in its backward.

    Returns:
        [N] float32 loss ``logsumexp(z) − z[label]`` (0 at ignored tokens). Gradients flow to
        ``hidden`` and ``weight`` (in their dtype); ``labels`` gets none.

    Example (the SFT stage)::

        hidden = final_hidden(model, batch)                     # [T, H]
        loss = fused_linear_cross_entropy(hidden, model.output_layer.weight, labels,
                                          chunk_size=4096, tp_group=tp)
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V_local, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H={hidden.shape[1]}] and weight [V_local, "
                         f"H={weight.shape[1]}] disagree on H")
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one of float32/bfloat16/float16, got "
                        f"{hidden.dtype} and {weight.dtype}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tp = _tp(tp_group)
    v_local = weight.shape[0]
    vocab = v_local * (1 if tp is None else dist.get_world_size(tp))
    labels = labels.to(hidden.device)
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= vocab))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) (the output "
                         f"layer's vocabulary) and is not ignore_index={ignore_index}")
    rows = keep.nonzero().squeeze(1)
    offset = 0 if tp is None else dist.get_rank(tp) * v_local
    local = labels.index_select(0, rows) - offset
    target = torch.where((local >= 0) & (local < v_local), local, -1).to(torch.int32)
    use_triton = hidden.is_cuda or interpreting()
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, rows, target, chunk_size, tp,
                                                 reduce_hidden_grad, use_triton)
