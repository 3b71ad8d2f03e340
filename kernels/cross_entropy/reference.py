"""Plain-PyTorch cross-entropy, written for clarity: the oracles of this package's kernels.

* ``chunk_stats_reference`` / ``chunk_grad_reference_``: what the two Triton kernels compute on
  one chunk of logits (full fp32 copies of the chunk). They are also the chunked path's pieces
  on a CPU without the Triton interpreter (``fused_linear.py``), so that path has the kernels'
  contract exactly.
* ``fused_linear_cross_entropy_reference``: the whole loss on one rank from full [N, V] fp32
  logits — nothing chunked, nothing fused.
"""
from __future__ import annotations

import torch


def chunk_stats_reference(logits: torch.Tensor, target: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max, Σ exp(z − max), z[target] or 0 when ``target`` is -1), fp32 [C] each.

    logits: [C, V_local]; target: [C] int (column on this shard, -1 when not owned).
    """
    z = logits.float()
    m = z.max(dim=1).values if z.shape[1] else z.new_full((z.shape[0],), float("-inf"))
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    s = (z - shift[:, None]).exp_().sum(dim=1)
    owned = target >= 0
    t = (z.gather(1, target.long().clamp(min=0)[:, None])[:, 0] if z.shape[1]
         else torch.zeros_like(m))
    return m, s, torch.where(owned, t, torch.zeros_like(t))


def chunk_grad_reference_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                          grad: torch.Tensor) -> None:
    """In place: ``logits ← grad[:, None] · (exp(logits − lse[:, None]) − onehot(target))``
    (fp32 logits without any copy; others through one fp32 copy of the chunk)."""
    fp32 = logits.dtype == torch.float32
    d = logits.sub_(lse[:, None]).exp_() if fp32 else torch.exp(logits.float() - lse[:, None])
    owned = (target >= 0).nonzero().squeeze(1)
    d[owned, target[owned].long()] -= 1.0
    d.mul_(grad[:, None])
    if not fp32:
        logits.copy_(d)


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                         labels: torch.Tensor, *,
                                         ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``logsumexp(z) − z[label]`` with ``z = hidden @ weight.T`` in fp32; 0 where
    ``labels == ignore_index``. hidden [N, H], weight [V, H], labels [N] → [N] fp32
    (differentiable w.r.t. hidden and weight)."""
    logits = hidden.float() @ weight.float().t()
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    loss = torch.logsumexp(logits, dim=1) - logits.gather(1, safe[:, None])[:, 0]
    return torch.where(keep, loss, torch.zeros_like(loss))
