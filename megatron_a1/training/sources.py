"""Where each step's micro-batches come from: packed datasets (SFT, OPD) or rollout groups (GRPO).

A source knows the run length, resumes from :class:`~megatron_a1.training.checkpoint.TrainerState`
and returns this rank's micro-batches for one step (advancing the state's data position).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from megatron.core import parallel_state

from megatron_a1.data.dataset import (
    BlendedPackedDataset,
    LoaderConfig,
    PackedDatasetConfig,
    build_dataloader,
    build_packed_dataset,
)

log = logging.getLogger("megatron_a1.train")


@dataclass
class StepData:
    micro_batches: list[dict]
    rollouts: object = None
    """GRPO: the step's :class:`~megatron_a1.training.rollout_groups.StepRollouts`."""
    info: dict = field(default_factory=dict)


def pad_multiple(rt) -> int | None:
    """Pack lengths round up to TP (x 2·CP with context parallelism), None when 1."""
    p = rt.parallel
    pad = p.tensor_parallel * (2 * p.context_parallel if p.context_parallel > 1 else 1)
    return pad if pad > 1 else None


class _Offline:
    """Offline inputs: no generation engine to keep in sync with the policy, nothing in flight."""

    def wants_weights(self, state) -> bool:
        return False

    def before_save(self, state) -> None:
        pass

    def close(self) -> None:
        pass


class PackedSource(_Offline):
    """Packed indexed datasets; the resume point is ``state.consumed_samples``."""

    def __init__(self, cfg, rt):
        self.cfg, self.rt, t = cfg, rt, cfg.train
        data_cfg = PackedDatasetConfig(prefixes=cfg.data.prefixes, weights=cfg.data.weights,
                                       max_seq_len=cfg.data.max_seq_len, seed=cfg.data.seed)
        one_epoch = build_packed_dataset(data_cfg)
        self.total_steps = (t.train_steps if t.train_steps is not None
                            else max(1, math.floor(len(one_epoch) * t.epochs / t.global_batch_size)))
        # The global sample index covers the whole run (blends wrap around their datasets),
        # so the consumed-sample count alone is the resume point.
        self.dataset = BlendedPackedDataset(one_epoch.datasets, cfg.data.weights or
                                            [len(d) for d in one_epoch.datasets],
                                            self.total_steps * t.global_batch_size)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)

    def start(self, state) -> None:
        t = self.cfg.train
        self.batches = iter(build_dataloader(self.dataset, LoaderConfig(
            micro_batch_size=t.micro_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=self.dp, consumed_samples=state.consumed_samples,
            num_workers=self.cfg.data.num_workers, pad_to_multiple=pad_multiple(self.rt))))

    def next_step(self, state) -> StepData:
        micro = [next(self.batches) for _ in range(self.num_micro)]
        state.consumed_samples += self.cfg.train.global_batch_size
        return StepData(micro)


class RolloutSource(_Offline):
    """GRPO rollout groups from a JSONL file; the resume point is ``state.data["group_cursor"]``."""

    def __init__(self, cfg, rt):
        from megatron_a1.training.rollout_groups import RolloutGroupSource

        g = cfg.grpo
        tokenizer = None
        if g.tokenizer:
            from megatron_a1.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(g.tokenizer)
        self.groups = RolloutGroupSource(
            g.rollouts, prompts_per_step=g.prompts_per_step, max_seq_len=cfg.data.max_seq_len,
            process_weight=g.asymmetric_process_weight, dynamic_sampling=g.dynamic_sampling,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), tokenizer=tokenizer,
            pad_to_multiple=pad_multiple(rt))
        t = cfg.train
        self.total_steps = (t.train_steps if t.train_steps is not None
                            else max(1, math.floor(self.groups.steps_per_epoch() * t.epochs)))
        if self.groups.errors:
            log.warning("%s: %d bad rollout record(s) skipped, e.g. %s", g.rollouts,
                        len(self.groups.errors), "; ".join(self.groups.errors[:3]))

    def start(self, state) -> None:
        state.data.setdefault("group_cursor", 0)

    def next_step(self, state) -> StepData:
        rollouts, state.data["group_cursor"] = self.groups.next_step(state.data["group_cursor"])
        state.consumed_samples += len(rollouts.samples)
        return StepData(rollouts.micro_batches, rollouts)


def make_source(cfg, rt, model: list):
    """Online rollouts when ``rollout.tasks`` is set, else the stage's offline inputs."""
    if cfg.rollout.tasks:
        from megatron_a1.training.online import OnlineRolloutSource

        return OnlineRolloutSource(cfg, rt, model[0])
    return RolloutSource(cfg, rt) if cfg.train.stage == "grpo" else PackedSource(cfg, rt)
