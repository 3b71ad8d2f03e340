"""Per-stage ``forward_step`` functions (megatron-core's convention).

``forward_step(data_iterator, model) -> (output, loss_func)``; ``loss_func(output) ->
(loss_sum, num_tokens, {"loss": [loss_sum, num_tokens], ...})``. The batch is one THD pack from
:func:`megatron_a1.data.dataset.collate_thd` (batch dim 1, ``cu_seqlens``), so attention and the
Gated DeltaNet state never cross a document boundary.

SFT's loss comes from one of two heads (``sft.fused_loss``): by default the fused linear
cross-entropy (:func:`a1_kernels.cross_entropy.fused_linear_cross_entropy`) on the final hidden
states and the output-layer weight — the hidden states taken as OPD and GRPO take them
(:func:`megatron_a1.training.opd.final_hidden`), so no stage ever holds [T, V] logits; else
megatron-core's output layer + vocab-parallel cross-entropy inside the model's forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from megatron_a1.data.dataset import packed_seq_params
from megatron_a1.training.losses import masked_token_sum


def _to_device(batch: dict) -> dict:
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sft_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Cross-entropy summed over masked-in tokens (megatron-core per-token convention)."""
    loss_sum, num_tokens = masked_token_sum(output, loss_mask)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def sft_forward_step(sft, data_iterator, model):
    """``sft``: the config's ``SFTSection`` (bound by :func:`make_stage`)."""
    batch = _to_device(next(data_iterator))
    inner = getattr(model, "module", model)
    if sft.fused_loss and inner.post_process:
        output = fused_sft_token_loss(model, batch, sft.chunk_size)
    else:  # also every pipeline stage but the last, which returns its hidden states
        # -100 marks "no label" (document ends, padding); the loss mask already zeroes those
        # positions, and megatron's vocab-parallel cross-entropy needs an in-range id there.
        labels = batch["labels"].clamp(min=0)
        output = model(batch["tokens"], batch["position_ids"], None, labels=labels,
                       packed_seq_params=packed_seq_params(batch))
    return output, partial(sft_loss, batch["loss_mask"])


def fused_sft_token_loss(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """[1, T] fp32 cross-entropy of the pack's tokens (0 where the loss mask is 0), from the
    final hidden states and the output-layer weight, ``chunk_size`` tokens at a time."""
    from a1_kernels.cross_entropy import fused_linear_cross_entropy
    from megatron_a1.training.opd import final_hidden

    inner = getattr(model, "module", model)
    if getattr(inner, "mtp_process", False) or getattr(inner.config, "use_mup", False):
        raise NotImplementedError("sft.fused_loss computes the output layer's loss only (no "
                                  "multi-token prediction or muP logit scaling); set "
                                  "sft.fused_loss=false")
    weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
              else inner.output_layer.weight)
    hidden = final_hidden(model, batch)  # [T, H]; with SP gathered (its backward reduce-scatters)
    mask = batch["loss_mask"][0].to(hidden.device)
    labels = torch.where(mask > 0, batch["labels"][0].to(hidden.device), -100)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size,
                                      tp_group=inner.pg_collection.tp,
                                      reduce_hidden_grad=not inner.config.sequence_parallel)
    return loss[None]


@dataclass
class Stage:
    name: str
    forward_step: Callable
    metrics: dict = field(default_factory=dict)
    """Extra per-step metrics the stage accumulates (e.g. per-domain loss)."""

    def prepare(self, micro_batches: list[dict]) -> None:
        """Per-step work on the step's micro-batches before the forward passes (none for SFT)."""

    def finish(self, step) -> None:
        """Per-step work after the optimizer step, e.g. metrics (none for SFT)."""


def make_stage(cfg, rt, info, model: list):
    """The stage selected by ``cfg.train.stage``; ``model`` is the (DDP-wrapped) policy."""
    if cfg.train.stage == "sft":
        return Stage("sft", partial(sft_forward_step, cfg.sft))
    if cfg.train.stage == "opd":
        from megatron_a1.training.model_setup import build_model_chunks
        from megatron_a1.training.opd import OPDStage, build_servers, build_teachers
        from megatron_a1.training.teacher_topk import build_stores

        return OPDStage(cfg, rt, build_teachers(cfg, rt, build_model_chunks),
                        cfg.opd.real_vocab_size, stores=build_stores(cfg, info.vocab_size),
                        servers=build_servers(cfg, info.vocab_size))
    from megatron_a1.training.grpo import GRPOStage, build_reference
    from megatron_a1.training.model_setup import build_model_chunks

    reference = build_reference(cfg, rt, build_model_chunks) if cfg.grpo.kl_coef else None
    return GRPOStage(cfg, model, reference)
