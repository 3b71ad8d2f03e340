"""Stage 2 (domain teachers): GRPO on rollout groups (DESIGN.md §1).

Per step the source (:mod:`megatron_a1.training.rollout_groups`) gives this rank's THD packs of
kept groups with each sample's advantage. ``prepare`` fills what the loss needs besides the
policy's own forward pass, without gradients:

* ``old_logprobs`` — the sampler's log-probs from the records; where a record has none, the
  current policy's (so the importance ratio starts at exactly 1, as in on-policy GRPO);
* ``ref_logprobs`` — the frozen reference policy's (``grpo.reference``, else the weights the run
  started from, ``model.init_from``), only when ``grpo.kl_coef > 0``.

The loss per token is :func:`~megatron_a1.training.losses.grpo_token_losses` (clip-higher PPO,
k3 KL, entropy bonus), summed over sampled tokens and divided by their number over the global
batch (megatron-core's per-token convention): token-level averaging, so long trajectories
weigh by their tokens (DAPO), not one vote per sequence. Log-probs and entropy come from the
final hidden states through :func:`~megatron_a1.training.logprobs.token_logprobs`, chunked and
vocab-parallel, never holding ``[T, V]`` logits.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_a1.training.logprobs import token_logprobs
from megatron_a1.training.losses import grpo_token_losses, masked_token_sum
from megatron_a1.training.opd import final_hidden, load_frozen

_STATS = ("clipped", "kl", "entropy", "ratio", "tokens")


def build_reference(cfg, rt, build_model_chunks) -> torch.nn.Module:
    """The frozen reference policy (weights only, eval mode, no gradients)."""
    return load_frozen(cfg, rt, cfg.grpo.reference or cfg.model.init_from, build_model_chunks)


class GRPOStage:
    name = "grpo"

    def __init__(self, cfg, policy: list, reference: torch.nn.Module | None):
        self.cfg, self.loss_cfg = cfg, cfg.grpo
        self.policy, self.reference = policy[0], reference
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.metrics: dict = {}
        self._stats = torch.zeros(len(_STATS), dtype=torch.float64)

    def _logprobs(self, model, batch, *, with_entropy=False):
        hidden = final_hidden(model, batch)
        weight = getattr(model, "module", model).output_layer.weight
        return token_logprobs(hidden, weight, batch["labels"][0].clamp(min=0),
                              chunk_size=self.cfg.grpo.chunk_size, with_entropy=with_entropy,
                              tp_group=self.tp_group,
                              # the sequence-parallel gather's backward already sums over TP
                              reduce_hidden_grad=not self.cfg.parallel.sequence_parallel)

    @torch.no_grad()
    def prepare(self, micro_batches: list[dict]) -> None:
        # Every rank runs the same number of forward passes in the same order (they hold
        # collectives), so "does any record lack log-probs" is agreed over DP first.
        missing = torch.tensor([float(any(torch.isnan(b["old_logprobs"]).any()
                                          for b in micro_batches))])
        torch.distributed.all_reduce(missing, group=parallel_state.get_data_parallel_group())
        was_training = self.policy.training
        self.policy.eval()
        try:
            for b in micro_batches:
                if missing.item():
                    current, _ = self._logprobs(self.policy, b)
                    b["old_logprobs"] = torch.where(torch.isnan(b["old_logprobs"]),
                                                    current.to(b["old_logprobs"]),
                                                    b["old_logprobs"])
                if self.reference is not None:
                    b["ref_logprobs"], _ = self._logprobs(self.reference, b)
        finally:
            self.policy.train(was_training)
        self._stats.zero_()

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        logp, entropy = self._logprobs(model, batch, with_entropy=bool(self.loss_cfg.entropy_coef))
        mask = batch["loss_mask"][0].to(logp.device)
        old = torch.nan_to_num(batch["old_logprobs"].to(logp), nan=0.0)
        adv = batch["advantages"].to(logp)
        ref = batch.get("ref_logprobs")
        token_loss, terms = grpo_token_losses(logp, old, adv, self.loss_cfg, ref_logprobs=ref,
                                              entropy=entropy, return_terms=True)
        loss_sum, num_tokens = masked_token_sum(token_loss, mask)
        self._accumulate(terms, entropy.detach(), mask)

        def loss_func(output):
            return output, num_tokens, {"loss": torch.stack([output.detach(),
                                                             num_tokens.float()])}

        return loss_sum, loss_func

    def _accumulate(self, terms, entropy, mask) -> None:
        m = mask.bool()
        kl = terms.kl[m].sum() if terms.kl is not None else torch.zeros((), device=m.device)
        sums = torch.stack([terms.clipped[m].sum(), kl, entropy[m].sum(), terms.ratio[m].sum(),
                            m.sum()])
        self._stats += sums.double().cpu()  # one device-to-host copy per micro-batch

    def finish(self, step) -> None:
        """Step metrics over the global batch (after the optimizer step)."""
        rollouts = step.rollouts
        stats = self._stats.clone()
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        n = max(stats[-1].item(), 1.0)
        m = {f"grpo/{k}": stats[i].item() / n for i, k in enumerate(_STATS[:-1])}
        m["grpo/clip_fraction"] = m.pop("grpo/clipped")
        samples = rollouts.samples
        m["reward/mean"] = sum(s.outcome for s in samples) / max(len(samples), 1)
        for d in sorted({s.domain for s in samples}):
            ds = [s.outcome for s in samples if s.domain == d]
            m[f"reward/{d}"] = sum(ds) / len(ds)
        m.update({"grpo/groups_kept": rollouts.groups_kept,
                  "grpo/groups_dropped": rollouts.groups_read - rollouts.groups_kept,
                  "grpo/samples": len(samples), "grpo/truncated": rollouts.truncated})
        self.metrics = m
