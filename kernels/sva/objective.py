"""The stage-3 objective: domain-normalised mean of per-token SVA losses, data-parallel aware.

    L = mean over domains d present of [ mean over samples i of d of ( mean over t ∈ R_i of ℓ_t ) ]

"Present" and the per-domain sample counts are global over the data-parallel group: each rank
holds some samples; domains may be present on some ranks only. Every rank gets the same global
value; the differentiable ``loss`` is this rank's share of L, scaled so that the data-parallel
gradient reduction yields ∂L exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class DomainLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar to call ``backward`` on: this rank's share of L (× DP size if ``dp_average_grads``)."""
    value: torch.Tensor
    """Scalar, detached: the global objective L, identical on every DP rank (log this)."""
    domain_means: torch.Tensor
    """[num_domains] float32, detached: global per-domain mean (nan where absent)."""
    domain_samples: torch.Tensor
    """[num_domains] float32, detached: global number of samples with a response token."""


def domain_normalized_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    sample_index: torch.Tensor,
    sample_domain: torch.Tensor,
    *,
    num_domains: int | None = None,
    dp_group: torch.distributed.ProcessGroup | None = None,
    dp_average_grads: bool = True,
) -> DomainLoss:
    """Domain-normalised SVA objective (DESIGN.md §4) over this rank's packed tokens.

    Args:
        token_loss: [T] float per-token loss (e.g. ``fused_linear_sva``'s output).
        response_mask: [T] bool/int, 1 on response (assistant) tokens. Others are ignored even if
            their loss is not finite.
        sample_index: [T] int, the local sample each token belongs to, in [0, S).
        sample_domain: [S] int, the domain id of each local sample, in [0, num_domains).
        num_domains: number of domain ids; required to be equal on all DP ranks (default: one
            more than the largest id, agreed over ``dp_group`` by a max all-reduce).
        dp_group: data-parallel group; sample counts and domain sums are all-reduced over it.
        dp_average_grads: the DP gradient reduction averages (megatron-core's default), so
            ``loss`` is scaled by the DP size; set False if it sums.

    A sample with no response token is not counted; a domain with no counted sample on any rank
    is not present. With no domain present, ``loss`` is 0 (connected to the graph) and ``value``
    is 0.
    """
    if token_loss.dim() != 1:
        raise ValueError(f"token_loss must be [T], got {tuple(token_loss.shape)}")
    n = token_loss.shape[0]
    for name, x in (("response_mask", response_mask), ("sample_index", sample_index)):
        if x.shape != (n,):
            raise ValueError(f"{name} must be [T={n}], got {tuple(x.shape)}")
    if sample_domain.dim() != 1:
        raise ValueError(f"sample_domain must be [S], got {tuple(sample_domain.shape)}")
    device = token_loss.device
    distributed = dp_group is not None and torch.distributed.get_world_size(dp_group) > 1
    if num_domains is None:
        top = torch.tensor([int(sample_domain.max()) + 1 if sample_domain.numel() else 0],
                           device=device)
        if distributed:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=dp_group)
        num_domains = int(top)
    n_samples = sample_domain.numel()
    resp = response_mask.bool()
    idx = sample_index[resp].long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_samples):
        raise ValueError("sample_index out of range of sample_domain")

    tokens = torch.zeros(n_samples, device=device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    sums = torch.zeros(n_samples, device=device, dtype=torch.float32).index_add(
        0, idx, token_loss[resp].float())
    counted = tokens > 0
    sample_mean = torch.where(counted, sums / tokens.clamp(min=1), torch.zeros_like(sums))
    dom = sample_domain.long()
    dom_sum = torch.zeros(num_domains, device=device).index_add(0, dom, sample_mean)
    dom_cnt = torch.zeros(num_domains, device=device).index_add_(0, dom, counted.float())

    stats = torch.stack([dom_sum.detach(), dom_cnt])
    if distributed:
        torch.distributed.all_reduce(stats, group=dp_group)
    g_sum, g_cnt = stats[0], stats[1]
    present = g_cnt > 0
    n_present = present.sum().clamp(min=1).float()
    weights = torch.where(present, 1.0 / (g_cnt.clamp(min=1) * n_present), torch.zeros_like(g_cnt))
    share = (dom_sum * weights).sum()
    scale = torch.distributed.get_world_size(dp_group) if (distributed and dp_average_grads) else 1
    value = (g_sum * weights).sum()
    means = torch.where(present, g_sum / g_cnt.clamp(min=1), torch.full_like(g_sum, float("nan")))
    return DomainLoss(share * scale, value.detach(), means, g_cnt)
