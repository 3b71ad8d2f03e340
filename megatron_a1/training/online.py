"""On-policy rollouts inside the training loop (GRPO groups and OPD student samples).

Each step: take the next prompts from the task list (domains interleaved, cycling), run the agent
loop (:mod:`megatron_a1.rollout.agent`) with the policy, and pack the records into THD
micro-batches (:mod:`megatron_a1.training.rollout_groups`).

* GRPO: ``samples_per_prompt`` episodes per prompt form a group; groups whose advantages are all
  zero are dropped (dynamic sampling) and more prompts are sampled until
  ``grpo.prompts_per_step`` groups are kept or ``rollout.max_refill_rounds`` rounds are spent
  (then the step trains on what it has; if nothing was kept, on the unfiltered groups, whose
  zero advantages leave only the KL and entropy terms).
* OPD: ``train.global_batch_size`` prompts per step, each sample routed to its domain's teacher.

Which weights sample step ``s`` (trained from version ``s-1`` to ``s``; every record carries the
``weight_version`` that sampled it) — :mod:`megatron_a1.training.rollout_pipeline`:

* ``rollout.max_staleness = 0``: version ``s-1``, the newest; generation and training alternate.
* ``max_staleness = k > 0``: version ``s-1-k``; a background thread samples the next ``k`` steps
  while the current one trains. The GRPO ratio against the records' log-probs corrects for the
  lag. The embedded engine then samples from a copy of the policy, refreshed every step.
* A server (vLLM/SGLang) gets new weights every ``rollout.sync_interval`` steps (a checkpoint,
  its HF export, the server's reload): the version is rounded down to that interval, so a rollout
  is at most ``k + sync_interval - 1`` steps stale.

The version rule depends on the step alone, so a resumed run samples what the uninterrupted run
sampled; batches in flight at a checkpoint are finished and stored in it (``TrainerState.data``:
``prompt_cursor``, ``rollouts_in_flight``) and trained after the resume, never lost.

Data-parallel replicas generate disjoint slices of the prompts and exchange records over a gloo
group of their own (usable from the background thread), so every rank trains on the same step;
tensor/pipeline/context-parallel peers of a replica get its slice rather than sampling their own.
"""
from __future__ import annotations

import datetime
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
from megatron_a1.training.rollout_pipeline import RolloutPipeline
from megatron_a1.training.sources import StepData, pad_multiple

log = logging.getLogger("megatron_a1.train")

EXCHANGE_TIMEOUT = datetime.timedelta(hours=4)
"""How long a rank waits for the others' rollouts (long agent episodes on a busy server)."""


@dataclass(kw_only=True)
class RolloutSection:
    engine: Literal["embedded", "vllm", "sglang"] = "embedded"
    """Where samples come from: the policy in-process, or a vLLM/SGLang server."""
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
    max_staleness: int = 0
    """Steps a rollout may lag the weights it trains: 0 samples each step with the newest
    weights; k > 0 samples up to k steps ahead in the background while training runs."""
    sync_interval: int = 1
    """vllm/sglang: push the policy's weights to the server every N steps (the disk path: a
    checkpoint, its HF export, the server's reload endpoint)."""
    weight_transfer: Literal["disk", "distributed"] = "disk"
    """How a server gets the weights: ``disk``, an HF export it reloads (any server; needs a
    file system both see); ``distributed``, SGLang only, broadcast from the step's checkpoint
    over NCCL (:mod:`megatron_a1.rollout.weight_transfer`; nothing written for the server)."""
    transfer_address: str | None = None
    """distributed: the address of rank 0's node as the server reaches it (default: its
    hostname's address)."""
    export_dir: str | None = None
    """disk: where the HF exports for the server go (``step_<N>`` in it; default:
    ``<checkpoint.dir>/hf_export``); must be readable by the server."""


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


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """``model``'s parameters and buffers by name: what a weight version is made of."""
    return [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t is not None]


def _weights(model) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s tensors (one published weight version)."""
    with torch.no_grad():
        return {n: t.detach().clone() for n, t in _tensors(model)}


def _load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in _tensors(model):
            t.copy_(weights[n])


def _snapshot(cfg, rt, live):
    """A second model of the policy's architecture holding its current weights (same dtypes),
    for sampling in the background while the policy trains."""
    from megatron_a1.training.model_setup import build_model_chunks

    with torch.random.fork_rng(devices=[]):  # the training run's random streams stay untouched
        model = build_model_chunks(cfg, rt)[0][0]
    weights = _weights(live)
    for n, t in _tensors(model):
        t.data = weights[n]  # the live tensors' dtypes, not the fresh model's
    model.requires_grad_(False)
    return model


def _exchange_group():
    """A gloo group over all ranks for the rollout exchange (None on one rank)."""
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)


class OnlineRolloutSource:
    """Rollouts generated by the policy, one batch per step (see the module docstring)."""

    def __init__(self, cfg, rt, policy):
        from megatron_a1.data.tokenizer import load_tokenizer
        from megatron_a1.rollout.agent import AgentConfig
        from megatron_a1.rollout.embedded import _unwrap
        from megatron_a1.rollout.engine import SamplingParams

        self.cfg, self.r = cfg, cfg.rollout
        self.grpo = cfg.train.stage == "grpo"
        self.embedded = self.r.engine == "embedded"
        self.background = self.r.max_staleness > 0
        self.tasks = _load_tasks(self.r.tasks)
        self.tokenizer = load_tokenizer(self.r.tokenizer)
        self.live = _unwrap(policy)
        sampler = _snapshot(cfg, rt, self.live) if self.embedded and self.background else policy
        self.sampler = _unwrap(sampler)
        self.engine = build_engine(self.r, sampler, self.tokenizer.vocab_size, cfg.train.seed)
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
        # one replica member samples; its tensor/pipeline/context peers take its slice
        self.samples_here = (parallel_state.get_tensor_model_parallel_rank() == 0
                             and parallel_state.get_pipeline_model_parallel_rank() == 0
                             and parallel_state.get_context_parallel_rank() == 0)
        self.exchange = _exchange_group()
        self.process_weight, self.dynamic_sampling = g.asymmetric_process_weight, g.dynamic_sampling
        t = cfg.train
        self.total_steps = t.train_steps if t.train_steps is not None else max(
            1, int(len(self.tasks) * t.epochs) // self.prompts)
        self.is_writer = torch.distributed.get_rank() == 0 and self.r.output
        self.stats: dict = {}
        self.skipped = 0
        self.cursor = 0
        self.pipeline: RolloutPipeline | None = None

    # -- the loop's interface ----------------------------------------------------------------
    def start(self, state) -> None:
        self.cursor = state.data.get("prompt_cursor", 0)
        self.pipeline = RolloutPipeline(self._produce, self._apply_weights, self._due_version,
                                        first=state.iteration + 1, last=self.total_steps,
                                        background=self.background)
        self.pipeline.restore(state.data.get("rollouts_in_flight") or {})
        if self.embedded:
            self._publish_live(state)
        elif state.iteration == 0:
            self.pipeline.publish(0)  # the server was launched with the initial weights
        else:  # resumed: the server may hold anything; give it the resumed weights
            from megatron_a1.training import checkpoint as ckpt

            self.push_weights(ckpt.latest_checkpoint(self.cfg.checkpoint.dir), state)
        self.pipeline.start()

    def next_step(self, state) -> StepData:
        if self.embedded:
            self._publish_live(state)
        start = time.perf_counter()
        batch = self.pipeline.get(state.iteration + 1)
        waited = time.perf_counter() - start
        rollouts = pack_step(batch["groups"], batch["read"], max_seq_len=self.max_seq_len,
                             dp_rank=self.dp_rank, dp_size=self.dp_size, pad_to_multiple=self.pad)
        state.consumed_samples += len(rollouts.samples)
        self.skipped += batch["skipped"]
        self._write(batch["records"], state)
        self._log_stats(batch["records"], batch["seconds"], waited, state.iteration)
        return StepData(rollouts.micro_batches, rollouts, info=self.stats)

    def before_save(self, state) -> None:
        """Finish the batches the published weights allow and store them with the cursor."""
        if self.embedded:
            self._publish_live(state)
        state.data["rollouts_in_flight"] = self.pipeline.drain()
        state.data["prompt_cursor"] = self.cursor

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    def wants_weights(self, state) -> bool:
        """True when the server must get the weights of this iteration (a checkpoint of it)."""
        return (not self.embedded and state.iteration % self.r.sync_interval == 0
                and self._due_version(self.total_steps) >= state.iteration)

    def push_weights(self, checkpoint: str, state) -> None:
        """Rank 0 exports ``checkpoint`` to HF for the server (distributed transfer: names the
        checkpoint, which the sender streams); the generator loads it when due."""
        path = None
        if torch.distributed.get_rank() == 0 and self.r.weight_transfer == "distributed":
            path = os.path.abspath(checkpoint)
        elif torch.distributed.get_rank() == 0:
            path = os.path.abspath(os.path.join(self._export_root(),
                                                f"step_{state.iteration:07d}"))
            export_hf(checkpoint, path, resolve_hf_config(self.cfg))
        torch.distributed.barrier()
        self.pipeline.publish(state.iteration, path)

    # -- weights -----------------------------------------------------------------------------
    def _due_version(self, step: int) -> int:
        v = max(0, step - 1 - self.r.max_staleness)
        return v if self.embedded else v - v % self.r.sync_interval

    def _publish_live(self, state) -> None:
        """Embedded: the policy's weights after ``state.iteration`` steps, if a batch is due
        with them (a copy when sampling runs beside training; else the live model itself)."""
        i = state.iteration
        if i == 0 or i + 1 + self.r.max_staleness <= self.total_steps:
            self.pipeline.publish(i, _weights(self.live) if self.background else None)

    def _apply_weights(self, version: int, payload) -> None:
        if self.embedded:
            if payload is not None:
                _load_weights(self.sampler, payload)
            self.engine.update_weights(version)
            return
        if payload is not None and self.r.weight_transfer == "distributed":
            _send_checkpoint(payload, self.r.url, version, self.r.transfer_address,
                             resolve_hf_config(self.cfg))
            log.info("weights of step %d broadcast to %s", version, self.r.url)
        elif payload is not None:  # rank 0: the HF export of that version
            from megatron_a1.rollout.weight_sync import weight_sync_for

            weight_sync_for(self.engine).update_from_disk(payload, version=version)
            log.info("weights of step %d loaded by %s", version, self.r.url)
            for old in os.listdir(self._export_root()):  # exports the server no longer needs
                if old.startswith("step_") and old < os.path.basename(payload):
                    shutil.rmtree(os.path.join(self._export_root(), old), ignore_errors=True)
        if self.exchange is not None:
            torch.distributed.barrier(group=self.exchange)  # the server has them: all sample
        self.engine.weight_version = version

    def _export_root(self) -> str:
        return self.r.export_dir or os.path.join(self.cfg.checkpoint.dir, "hf_export")

    # -- one step's batch (runs in the generator: own process group only) ---------------------
    def _produce(self, step: int) -> dict:
        """Sample the prompts of ``step`` (refilling dropped GRPO groups): every record (for the
        output file and the logs), the groups to train (samples with their advantages), and the
        counts the step logs."""
        start, records, kept, read, rounds, skipped = time.perf_counter(), [], [], [], 0, 0
        while len(kept) < self.prompts and rounds <= (self.r.max_refill_rounds
                                                      if self.grpo else 0):
            for group_records in self._generate(self.prompts - len(kept)):
                records += group_records
                group, bad = self._parse_group(group_records, step)
                skipped += bad
                if not group:
                    continue
                read.append(group)
                if self.grpo:
                    assign_advantages(group, self.process_weight)
                    if self.dynamic_sampling and not any(s.advantage for s in group):
                        continue
                kept.append(group)
            rounds += 1
        if not kept and read and self.dp_rank == 0:
            log.warning("step %d: no rollout group with distinct rewards after %d rounds; "
                        "training on the unfiltered groups", step, rounds)
        groups = kept or read
        if not groups:
            raise RuntimeError(f"step {step}: no rollout sampled any token; "
                               "check rollout.context_limit against the prompt lengths")
        return {"records": records, "groups": groups[:self.prompts], "read": len(read),
                "skipped": skipped, "seconds": time.perf_counter() - start}

    @staticmethod
    def _parse_group(records: list[dict], step: int) -> tuple[list, int]:
        """The group's samples, and how many records had nothing to train on (e.g. a prompt
        longer than the context: nothing sampled)."""
        samples, bad = [], 0
        for rec in records:
            try:
                samples.append(parse_rollout(rec, f"step {step} rollout {rec['id']}"))
            except RolloutRecordError as exc:
                bad += 1
                log.warning("%s (skipped)", exc)
        return samples, bad

    def _generate(self, n_prompts: int) -> list[list[dict]]:
        """``n_prompts`` groups from the cursor on; each replica runs its slice, all exchange."""
        from megatron_a1.rollout.agent import group_rollouts

        cursor = self.cursor
        chosen = [self.tasks[(cursor + i) % len(self.tasks)] for i in range(n_prompts)]
        self.cursor = cursor + n_prompts
        groups: list[list[dict]] = []
        if self.samples_here:
            by_domain: dict[str, list[dict]] = {}
            for d, task in chosen[self.dp_rank::self.dp_size]:
                by_domain.setdefault(d, []).append(task)
            # a fresh seed per (run seed, prompt position, replica): samples differ across
            # steps and replicas, and a resumed run draws the same ones
            self.agent.seed = zlib.crc32(f"{self.cfg.train.seed}:{cursor}:{self.dp_rank}".encode())
            if by_domain:
                groups = group_rollouts(self.engine, by_domain, self.r.samples_per_prompt,
                                        self.tokenizer, self.agent)
        if self.exchange is None:
            return groups
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(
            gathered, (self.dp_rank, groups) if self.samples_here else None, group=self.exchange)
        slices = sorted((x for x in gathered if x is not None), key=lambda x: x[0])
        return [g for _, part in slices for g in part]

    # -- output ------------------------------------------------------------------------------
    def _write(self, records: list[dict], state) -> None:
        if not self.is_writer:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.r.output)), exist_ok=True)
        with open(self.r.output, "a") as f:
            for rec in records:
                f.write(json.dumps({**rec, "step": state.iteration + 1}) + "\n")

    def _log_stats(self, records: list[dict], seconds: float, waited: float,
                   iteration: int) -> None:
        from megatron_a1.rollout.agent import RolloutStats

        # every episode of the step (dropped groups included), so the reward curve is unbiased
        summary = RolloutStats.from_records(records, seconds).as_dict()
        versions = [(r.get("weight_version") or {}).get("min") for r in records]
        versions = [v for v in versions if v is not None]
        self.stats = {"rollout/seconds": seconds,
                      # the trainer idle, waiting for this step's rollouts
                      "rollout/wait_seconds": waited,
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


def resolve_hf_config(cfg) -> dict:
    from megatron_a1.training.model_setup import resolve_model_config

    return resolve_model_config(cfg.model).to_hf_config_dict()


def _job_free_env() -> dict:
    """This process's environment without the launcher's rendezvous variables: a helper
    process runs its own one-rank job."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}


def _send_checkpoint(checkpoint: str, url: str, version: int, address: str | None,
                     hf_config: dict) -> None:
    """Broadcast ``checkpoint`` to the SGLang server (its own process: see weight_transfer)."""
    if not os.path.isdir(checkpoint):
        raise RuntimeError(f"{checkpoint} was removed before its weights were sent to the "
                           "server: raise checkpoint.keep_last above rollout.max_staleness + 1")
    cmd = [sys.executable, "-m", "megatron_a1.rollout.weight_transfer", "--checkpoint",
           checkpoint, "--url", url, "--version", str(version), "--hf-config-json",
           json.dumps(hf_config)] + (["--address", address] if address else [])
    subprocess.run(cmd, check=True, env=_job_free_env())


def export_hf(checkpoint: str, out_dir: str, hf_config: dict) -> None:
    """HF safetensors of a dist_checkpointing checkpoint in ``out_dir``, replaced atomically.

    The converter streams one tensor at a time in a process of its own (it runs outside any
    process group), so a multi-rank job calls this on one rank.
    """
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    env = _job_free_env()
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
