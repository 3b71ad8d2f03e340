"""Stage losses as small functions (DESIGN.md §1).

All losses follow megatron-core's per-token convention: they return the *sum* over the micro-
batch's counted tokens and the number of those tokens; megatron sums gradients over micro-batches
and DP ranks and divides by the global token count (``calculate_per_token_loss=True``). The
loss of a step is therefore the mean over every counted token of the global batch — each token
weighs the same, whichever sequence it sits in (not a mean of per-sequence means).

* SFT: cross-entropy on masked-in (assistant) tokens.
* GRPO: group-normalised advantages (with the tool teacher's asymmetric process term), dynamic
  sampling, PPO clipped objective with clip-higher, k3 KL to a reference policy and an entropy
  bonus, averaged per token.
* OPD: the SVA loss lives in ``a1_kernels.sva``; see :mod:`megatron_a1.training.opd`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_token_sum(token_losses: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``token_losses`` over ``loss_mask`` and the number of masked-in tokens.

    Args:
        token_losses: [...] per-token losses (any float dtype; summed in float32).
        loss_mask: [...] same shape, 1.0 where the token counts.
    Returns:
        (loss_sum: float32 scalar, num_tokens: int32 scalar)
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (token_losses.reshape(-1).float() * mask).sum()
    return loss_sum, mask.sum().to(torch.int)


# ----------------------------------------------------------------------------------- GRPO


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantage: (r - mean_group(r)) / (std_group(r) + eps), population std.

    A group of one sample, or whose rewards are all equal, gets advantage 0 (nothing to learn;
    dynamic sampling normally drops such groups before they reach the loss).

    Args:
        rewards: [S] float, one per sample.
        group_ids: [S] int, samples of the same prompt share an id.
    """
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx].float()
        if r.numel() < 2:
            continue
        std = r.std(unbiased=False)
        adv[idx] = 0.0 if std == 0 else (r - r.mean()) / (std + eps)
    return adv


def asymmetric_tool_advantages(
    outcome: Tensor, process: Tensor, group_ids: Tensor, process_weight: float = 0.5,
    eps: float = 1e-6,
) -> Tensor:
    """The tool teacher's advantage ``A = A_out + w * 1[r_out = 0] * A_proc`` (DESIGN.md §1).

    ``A_out`` is normalised over all samples of the group; ``A_proc`` only over the group's
    negative samples (``r_out == 0``), so process rewards rank failures against each other
    without pulling successes down. Samples with ``r_out != 0`` get no process term.
    """
    a_out = group_advantages(outcome, group_ids, eps)
    a_proc = torch.zeros_like(a_out)
    neg = outcome == 0
    for g in torch.unique(group_ids):
        idx = (group_ids == g) & neg
        p = process[idx].float()
        if p.numel() < 2:
            continue
        std = p.std(unbiased=False)
        a_proc[idx] = 0.0 if std == 0 else (p - p.mean()) / (std + eps)
    return a_out + process_weight * neg.float() * a_proc


def dynamic_sampling_keep(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[S] bool: keep samples of groups whose rewards are not all equal (DAPO-style filter)."""
    keep = torch.zeros_like(group_ids, dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx]
        keep[idx] = bool((r != r[0]).any())
    return keep


@dataclass(kw_only=True)
class GRPOLossConfig:
    clip_low: float = 0.2
    """PPO ratio clip below: 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio clip above: 1 + clip_high ("clip-higher")."""
    kl_coef: float = 0.001
    """Weight of the KL penalty to the reference policy (k3 estimator); 0 disables it."""
    entropy_coef: float = 0.0001
    """Weight of the entropy bonus (subtracted from the loss)."""


@dataclass
class GRPOTerms:
    """What the GRPO loss saw at each token (detached), for the step's metrics."""

    ratio: Tensor
    """[T] importance ratio ρ_t."""
    clipped: Tensor
    """[T] bool: the clip bound was active (ρ above 1+ε_high with A > 0, or below 1-ε_low with
    A < 0): the token gave no policy gradient."""
    kl: Tensor | None
    """[T] k3 estimate of KL(π‖π_ref), when the KL term is on."""


def grpo_token_losses(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    cfg: GRPOLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, GRPOTerms]:
    """Per-token GRPO loss (to be summed over response tokens and divided by their count).

    ``loss_t = -min(ρ_t A, clip(ρ_t, 1-ε_low, 1+ε_high) A) + β·k3_t - c_H·H_t`` with
    ``ρ_t = exp(logp_t - logp_old_t)`` and ``k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1``.

    Args:
        logprobs: [T] log-probabilities of the sampled tokens under the current policy.
        old_logprobs: [T] under the policy that sampled them (no grad).
        advantages: [T] the sample's advantage broadcast to its tokens.
        ref_logprobs: [T] under the frozen reference (required when ``kl_coef > 0``).
        entropy: [T] policy entropy at each position (required when ``entropy_coef > 0``).
        return_terms: also return the :class:`GRPOTerms` (one computation for loss and metrics).
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    low, high = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    loss = -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)
    kl = None
    if cfg.kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (set grpo.kl_coef=0 to disable)")
        delta = ref_logprobs.detach() - logprobs
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + cfg.kl_coef * kl
    if cfg.entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the policy entropy")
        loss = loss - cfg.entropy_coef * entropy
    if not return_terms:
        return loss
    ratio = ratio.detach()
    clipped = ((ratio > high) & (advantages > 0)) | ((ratio < low) & (advantages < 0))
    return loss, GRPOTerms(ratio, clipped, None if kl is None else kl.detach())
