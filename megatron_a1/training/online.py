"""On-policy rollouts inside the training loop (GRPO groups and OPD student samples).

Each step: take the next prompts from the task list (domains interleaved, cycling; the cursor
``state.data["prompt_cursor"]`` is the resume point), run the agent loop
(:mod:`megatron_a1.rollout.agent`) with the current policy, and pack the records into THD
micro-batches (:mod:`megatron_a1.training.rollout_groups`).

* GRPO: ``samples_per_prompt`` episodes per prompt form a group; groups whose advantages are all
  zero are dropped (dynamic sampling) and more prompts are sampled until
  ``grpo.prompts_per_step`` groups are kept or ``rollout.max_refill_rounds`` rounds are spent
  (then the step trains on what it has; if nothing was kept, on the unfiltered groups, whose
  zero advantages leave only the KL and entropy terms).
* OPD: ``train.global_batch_size`` prompts per step, each sample routed to its domain's teacher.

Generation is synchronous: the rollouts of step N are sampled by the weights after step N-1
(staleness 0; with ``rollout.sync_interval`` N > 1 on a server, at most N-1 steps stale — each
record carries the ``weight_version`` that sampled it). Data-parallel ranks generate disjoint slices of the prompts and exchange records,
so every rank sees the same step. With the embedded engine each rank samples from its own copy
of the live policy (model-parallel size 1).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from megatron.core import parallel_state

from megatron_a1.training.rollout_groups import (RolloutRecordError, assign_advantages, pack_step,
                                                 parse_rollout)
from megatron_a1.training.sources import StepData, pad_multiple

log = logging.getLogger("megatron_a1.train")


@dataclass(kw_only=True)
class RolloutSection:
    engine: Literal["embedded", "vllm", "sglang"] = "embedded"
    """Where samples come from: the live policy in-process, or a vLLM/SGLang server."""
    url: str | None = None
    """Server base URL (vllm/sglang)."""
    tokenizer: str = "qwen"
    """Tokenizer spec (renders prompts and tool responses)."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Domain → task JSONL (``bundled``: the tasks shipped with the environment). Empty: the
    stage reads its offline inputs (``grpo.rollouts`` / ``data.prefixes``) instead."""
    samples_per_prompt: int = 8
    """GRPO group size (OPD: samples per prompt, usually 1)."""
    max_turns: int = 4
    max_tokens: int = 1024
    """Sampled tokens per episode."""
    max_turn_tokens: int = 512
    context_limit: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    enable_thinking: bool = True
    max_refill_rounds: int = 4
    """GRPO: extra rounds of prompts when dynamic sampling dropped groups."""
    output: str | None = None
    """Append every rollout record here (JSONL, rank 0)."""
    sync_interval: int = 1
    """vllm/sglang: push the policy's weights to the server every N steps (the disk path: a
    checkpoint, its HF export, the server's reload endpoint). The embedded engine always samples
    with the live weights."""
    export_dir: str | None = None
    """Where the HF export for the server goes (default: ``<checkpoint.dir>/hf_export``); must
    be readable by the server."""


def _load_tasks(tasks: dict[str, str]) -> list[tuple[str, dict]]:
    from megatron_a1.envs import bundled_tasks, load_tasks

    per_domain = [(d, bundled_tasks(d) if p == "bundled" else load_tasks(p))
                  for d, p in sorted(tasks.items())]
    out, i = [], 0
    while any(i < len(ts) for _, ts in per_domain):  # interleave domains
        out += [(d, ts[i]) for d, ts in per_domain if i < len(ts)]
        i += 1
    return out


def build_engine(r: RolloutSection, policy, vocab_size: int, seed: int):
    if r.engine == "embedded":
        from megatron_a1.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(policy, vocab_size=vocab_size, seed=seed,
                              max_context=r.context_limit)
    from megatron_a1.rollout.http import HTTPEngine

    return HTTPEngine(r.url, backend=r.engine)


class OnlineRolloutSource:
    """Rollouts generated each step by the current policy."""

    def __init__(self, cfg, rt, policy):
        from megatron_a1.data.tokenizer import load_tokenizer
        from megatron_a1.rollout.agent import AgentConfig
        from megatron_a1.rollout.engine import SamplingParams

        self.cfg, self.r = cfg, cfg.rollout
        self.grpo = cfg.train.stage == "grpo"
        self.tasks = _load_tasks(self.r.tasks)
        self.tokenizer = load_tokenizer(self.r.tokenizer)
        self.engine = build_engine(self.r, policy, self.tokenizer.vocab_size, cfg.train.seed)
        self.agent = AgentConfig(
            max_turns=self.r.max_turns, max_tokens=self.r.max_tokens,
            max_turn_tokens=self.r.max_turn_tokens, context_limit=self.r.context_limit,
            enable_thinking=self.r.enable_thinking,
            sampling=SamplingParams(temperature=self.r.temperature, top_p=self.r.top_p,
                                    top_k=self.r.top_k))
        self.prompts = cfg.grpo.prompts_per_step if self.grpo else cfg.train.global_batch_size
        g = cfg.grpo
        self.max_seq_len, self.pad = cfg.data.max_seq_len, pad_multiple(rt)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.process_weight, self.dynamic_sampling = g.asymmetric_process_weight, g.dynamic_sampling
        t = cfg.train
        self.total_steps = t.train_steps if t.train_steps is not None else max(
            1, int(len(self.tasks) * t.epochs) // self.prompts)
        self.is_writer = torch.distributed.get_rank() == 0 and self.r.output
        self.stats: dict = {}
        self.skipped = 0

    def start(self, state) -> None:
        state.data.setdefault("prompt_cursor", 0)

    def next_step(self, state):
        if self.r.engine == "embedded":
            self.engine.update_weights(state.iteration)  # the live weights after the last step
        start, kept, read, rounds, records = time.perf_counter(), [], [], 0, []
        samples_per_prompt = self.r.samples_per_prompt
        while len(kept) < self.prompts and rounds <= (self.r.max_refill_rounds if self.grpo else 0):
            need = self.prompts - len(kept)
            groups = self._generate(state, need, samples_per_prompt)
            rounds += 1
            for records_of_group in groups:
                records += records_of_group
                group = []
                for rec in records_of_group:
                    try:
                        group.append(parse_rollout(rec, f"step {state.iteration + 1} rollout "
                                                        f"{rec['id']}"))
                    except RolloutRecordError as exc:  # e.g. nothing sampled: prompt too long
                        self.skipped += 1
                        log.warning("%s (skipped)", exc)
                if not group:
                    continue
                read.append(group)
                if self.grpo:
                    assign_advantages(group, self.process_weight)
                    if self.dynamic_sampling and not any(s.advantage for s in group):
                        continue
                kept.append(group)
        if not kept and self.dp_rank == 0:
            log.warning("step %d: no rollout group with distinct rewards after %d rounds; "
                        "training on the unfiltered groups", state.iteration + 1, rounds)
        kept = kept or read
        if not kept:
            raise RuntimeError(f"step {state.iteration + 1}: no rollout sampled any token; "
                               "check rollout.context_limit against the prompt lengths")
        rollouts = pack_step(kept[:self.prompts], len(read), max_seq_len=self.max_seq_len,
                             dp_rank=self.dp_rank, dp_size=self.dp_size,
                             pad_to_multiple=self.pad)
        state.consumed_samples += len(rollouts.samples)
        self._write(records, state)
        self._log_stats(records, time.perf_counter() - start, state.iteration)
        return StepData(rollouts.micro_batches, rollouts, info=self.stats)

    def wants_weights(self, state) -> bool:
        """True when the server must get the weights of this iteration before the next step."""
        return self.r.engine != "embedded" and state.iteration % self.r.sync_interval == 0

    def push_weights(self, checkpoint: str, state) -> None:
        """Rank 0 exports ``checkpoint`` to HF and has the server reload it; the others wait."""
        if torch.distributed.get_rank() == 0:
            from megatron_a1.rollout.weight_sync import weight_sync_for
            from megatron_a1.training.model_setup import resolve_model_config

            out = self.r.export_dir or os.path.join(self.cfg.checkpoint.dir, "hf_export")
            export_hf(checkpoint, out, resolve_model_config(self.cfg.model).to_hf_config_dict())
            weight_sync_for(self.engine).update_from_disk(os.path.abspath(out),
                                                          version=state.iteration)
            log.info("weights of step %d pushed to %s", state.iteration, self.r.url)
        torch.distributed.barrier()

    def _generate(self, state, n_prompts: int, samples: int) -> list[list[dict]]:
        """``n_prompts`` groups from the cursor on; this DP rank runs its slice, all exchange."""
        from megatron_a1.rollout.agent import group_rollouts

        cursor = state.data["prompt_cursor"]
        chosen = [self.tasks[(cursor + i) % len(self.tasks)] for i in range(n_prompts)]
        state.data["prompt_cursor"] = cursor + n_prompts
        dp, rank = self.dp_size, self.dp_rank
        mine = chosen[rank::dp]
        # a fresh seed per (run seed, prompt position): samples differ across steps and ranks
        agent = self.agent
        agent.seed = zlib.crc32(f"{self.cfg.train.seed}:{cursor}:{rank}".encode())
        groups: list[list[dict]] = []
        by_domain: dict[str, list[dict]] = {}
        for d, task in mine:
            by_domain.setdefault(d, []).append(task)
        if by_domain:
            groups = group_rollouts(self.engine, by_domain, samples, self.tokenizer, agent)
        gathered = [None] * dp
        torch.distributed.all_gather_object(gathered, groups,
                                            group=parallel_state.get_data_parallel_group())
        return [g for part in gathered for g in part]

    def _write(self, records: list[dict], state) -> None:
        if not self.is_writer:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.r.output)), exist_ok=True)
        with open(self.r.output, "a") as f:
            for rec in records:
                f.write(json.dumps({**rec, "step": state.iteration + 1}) + "\n")

    def _log_stats(self, records: list[dict], seconds: float, iteration: int) -> None:
        from megatron_a1.rollout.agent import RolloutStats

        # every episode of the step (dropped groups included), so the reward curve is unbiased
        summary = RolloutStats.from_records(records, seconds).as_dict()
        versions = [(r.get("weight_version") or {}).get("min") for r in records]
        versions = [v for v in versions if v is not None]
        self.stats = {"rollout/seconds": seconds,
                      # steps between the weights that sampled a token and the ones it trains
                      "rollout/staleness": iteration - min(versions) if versions else 0,
                      "rollout/gen_tokens_per_s": summary["all"]["tokens_per_s"] or 0.0,
                      "rollout/skipped_total": self.skipped}
        for d, s in summary.items():
            self.stats.update({f"rollout/{d}/reward": s["mean_outcome"],
                               f"rollout/{d}/episodes": s["episodes"],
                               f"rollout/{d}/turns": s["mean_turns"],
                               f"rollout/{d}/tool_calls": s["tool_calls"],
                               f"rollout/{d}/tool_errors": s["tool_errors"],
                               f"rollout/{d}/malformed_calls": s["malformed_calls"],
                               f"rollout/{d}/retokenization_mismatch":
                                   s["retokenization_mismatch"]})


def export_hf(checkpoint: str, out_dir: str, hf_config: dict) -> None:
    """HF safetensors of a dist_checkpointing checkpoint in ``out_dir``, replaced atomically.

    The converter streams one tensor at a time in a process of its own (it runs outside any
    process group), so a multi-rank job calls this on one rank.
    """
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    code = ("import json, sys; from megatron_a1.model.convert import megatron_to_hf; "
            "megatron_to_hf(sys.argv[1], sys.argv[2], hf_config=json.loads(sys.argv[3]), "
            "log=lambda *a, **k: None)")
    subprocess.run([sys.executable, "-c", code, checkpoint, tmp, json.dumps(hf_config)],
                   check=True, env=env)
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
