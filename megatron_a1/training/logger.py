"""Console, TensorBoard (and optional W&B / JSONL) logging of training steps.

A console line per ``log_interval`` steps::

    step 12/40 | loss 2.3141 | grad 0.812 | lr 2.9e-04 | 8,432 tok/s | 0.41 TFLOP/s/GPU |
    mem 3.1 GiB (rss) | moe-imbalance 1.07 | eta 0:01:10

Throughput counts the real (unpadded) tokens of the global batch; TFLOP/s per GPU uses the FLOP
model in :mod:`megatron_a1.training.metrics`.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time

import torch

from megatron_a1.training.metrics import MoELoadTracker, flop_model, memory_gib, step_counts

log = logging.getLogger("megatron_a1.train")


class MetricsLogger:
    def __init__(self, cfg, rt, info, model_chunks):
        self.cfg, self.rt = cfg, rt
        self.interval = max(1, cfg.logging.log_interval)
        self.is_main = rt.rank == rt.world_size - 1  # the last rank holds the last PP stage
        self.flops = flop_model(model_chunks, info.transformer_config, pattern=info.pattern,
                                num_experts=info.num_experts, top_k=info.top_k)
        self.moe = MoELoadTracker(model_chunks)
        self.t0, self.tokens_seen = time.perf_counter(), 0
        self.last_loss, self.history = float("nan"), []
        self.tb = self.jsonl = None
        if self.is_main and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.logging.tensorboard_dir)
        if self.is_main and cfg.logging.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.metrics_jsonl)), exist_ok=True)
            self.jsonl = open(cfg.logging.metrics_jsonl, "a")
        if self.is_main and cfg.logging.wandb_project:
            import wandb  # optional dependency: pip install wandb

            wandb.init(project=cfg.logging.wandb_project)
            self.wandb = wandb
        else:
            self.wandb = None

    def info(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def step(self, state, result, micro_batches, elapsed, lr, total_steps, extra: dict) -> None:
        from megatron.core import parallel_state

        step_tokens, step_flops = step_counts(micro_batches, self.flops,
                                              parallel_state.get_data_parallel_group())
        self.tokens_seen += step_tokens
        tflops = step_flops / elapsed / 1e12 / self.rt.world_size
        self.last_loss = result.loss
        self.history.append(result.loss)
        metrics = {
            "step": state.iteration, "loss": result.loss, "grad_norm": result.grad_norm,
            "lr": lr, "tokens_per_s": step_tokens / elapsed,
            "tflops_per_gpu": tflops, "skipped": result.skipped,
            "consumed_samples": state.consumed_samples, **extra,
        }
        mem, what = memory_gib()
        metrics["memory_gib"] = mem
        imbalance = self.moe.imbalance()  # a collective: before the non-main ranks return
        if imbalance is not None:
            metrics["moe_imbalance"] = imbalance
        if not self.is_main:
            return
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, state.iteration)
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log(metrics, step=state.iteration)
        if state.iteration % self.interval == 0 or state.iteration == total_steps:
            done = state.iteration
            rate = (time.perf_counter() - self.t0) / max(done, 1)
            eta = datetime.timedelta(seconds=int(rate * (total_steps - done)))
            print(f"step {done}/{total_steps} | loss {result.loss:.4f} | grad "
                  f"{result.grad_norm:.3f} | lr {metrics['lr']:.2e} | "
                  f"{metrics['tokens_per_s']:,.0f} tok/s | {tflops:.3f} TFLOP/s/GPU | "
                  f"mem {mem:.1f} GiB ({what}) | "
                  + (f"moe-imbalance {imbalance:.2f} | " if imbalance is not None else "")
                  + _reward(metrics)
                  + f"eta {eta}"
                  + (" | SKIPPED (non-finite)" if result.skipped else ""), flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.jsonl:
            self.jsonl.close()


def _reward(metrics: dict) -> str:
    """Mean reward for the console: every episode of an online step, else the trained ones."""
    for key in ("rollout/all/reward", "reward/mean"):
        if key in metrics:
            return f"reward {metrics[key]:.3f} | "
    return ""
