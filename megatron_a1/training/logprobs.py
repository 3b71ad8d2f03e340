"""Per-token log-probabilities and entropies from hidden states, chunked and vocab-parallel.

GRPO needs ``log p(y_t)`` of each sampled token and the policy entropy ``H_t`` — never the
``[T, V]`` logits at once: with V = 248,320 and T = 131,072 those are 130 GB in fp32. The LM head
is applied ``chunk_size`` positions at a time, each chunk under activation checkpointing (its
``[chunk, V]`` logits are recomputed in the backward pass instead of stored), the same trade
Liger-Kernel's fused linear cross-entropy makes.

With tensor parallelism the LM head's rows (the vocabulary) are split over the TP group: each
rank has logits for ``[vocab_start, vocab_start + V_local)``. The max is all-reduced (no
gradient: it only stabilises), and the partial sums (``Σ exp``, the target logit, ``Σ exp·z``) go
through megatron-core's ``reduce_from_tensor_model_parallel_region``: all-reduce forward,
identity backward — right for a sum of per-rank partials whose consumers are replicated (so a
reduced value is never fed back into a rank-local term).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _reduce(x: Tensor, tp_group) -> Tensor:
    if tp_group is None:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=tp_group)


def _chunk(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, tp_group,
           with_entropy: bool) -> tuple[Tensor, Tensor]:
    z = (hidden @ weight.t()).float()  # [c, V_local]
    m = z.detach().max(dim=-1).values
    if tp_group is not None:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m[:, None])
    s = _reduce(e.sum(-1), tp_group)
    lse = m + torch.log(s)
    local = labels - vocab_start
    owned = (local >= 0) & (local < z.shape[1])
    target = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0] * owned
    logp = _reduce(target, tp_group) - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    # H = lse - E_p[z] = lse - (Σ e·z) / (Σ e): reduce the numerator, then divide on every rank,
    # so each consumer of a reduced value is replicated (what identity-backward assumes)
    return logp, lse - _reduce((e * z).sum(-1), tp_group) / s


def token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_size: int = 4096,
                   with_entropy: bool = False, tp_group=None,
                   reduce_hidden_grad: bool = True) -> tuple[Tensor, Tensor]:
    """``(log p(labels), entropy)`` per position, float32.

    Args:
        hidden: [T, H] final-norm hidden states (the LM head's input).
        weight: [V_local, H] this rank's LM-head rows (all of them without TP).
        labels: [T] int64 target ids (any in-range id where the loss mask is 0).
        chunk_size: positions per LM-head chunk (memory is O(chunk_size * V_local)).
        with_entropy: also return the entropy of the full distribution (else zeros).
        tp_group: the tensor-parallel group when ``weight`` is a vocab shard (None: no TP).
        reduce_hidden_grad: with TP, sum ``hidden``'s gradient over the group (each rank only
            sees its shard's part) — what a column-parallel LM head's input mapping does. False
            when the caller's sequence-parallel gather already sums it in its backward.
    Returns:
        logp [T], entropy [T]; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    tp = tp_group if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1 else None
    vocab_start = weight.shape[0] * torch.distributed.get_rank(tp) if tp is not None else 0
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if tp is not None and reduce_hidden_grad and grad:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp)
    outs = []
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s:s + chunk_size], weight, labels[s:s + chunk_size], vocab_start, tp,
                with_entropy)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
