"""GRPO inputs: rollout records → groups → advantages → THD micro-batches.

A rollout record (one JSON object per line; :mod:`megatron_a1.rollout.agent` writes them) has
``prompt_id`` (samples of one prompt form a group; ``group_id`` overrides it when one prompt is
sampled in several steps), ``domain``, ``rewards: {"outcome", "process"?}`` and either
``tokens`` + ``loss_mask`` (1 on sampled tokens) + optional ``logprobs`` (the engine's log-prob
of each token), or OpenAI ``messages`` (+ ``tools``) that the data pipeline renders (the
assistant tokens are the trained ones; log-probs are then recomputed by the trainer).

Per step (:class:`RolloutGroupSource`): read the next groups in file order, compute advantages
(group-normalised, or the tool teacher's asymmetric ``A_out + w·1[r_out=0]·A_proc``), drop the
groups whose advantages are all zero (dynamic sampling: all rewards equal, or a single sample)
and read on until ``prompts_per_step`` groups are kept, then pack the samples first-fit
decreasing into ``max_seq_len`` packs, split over the DP ranks. The cursor (groups consumed) is
the resume point.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_a1.data.dataset import build_sample, collate_thd
from megatron_a1.training.losses import asymmetric_tool_advantages, group_advantages


class RolloutRecordError(ValueError):
    """A rollout record that cannot be trained on; the message names its file and line."""


@dataclass
class RolloutSample:
    prompt_id: str
    domain: str
    tokens: np.ndarray
    """[N] int64: prompt, sampled and tool-response ids, as the model saw them."""
    mask: np.ndarray
    """[N] float32: 1 on the tokens the policy sampled (the trained ones)."""
    logprobs: np.ndarray | None
    """[N] float32: the sampler's log-prob of each token (None: recompute in the trainer)."""
    outcome: float
    process: float | None
    where: str
    advantage: float = 0.0


def parse_rollout(obj: dict, where: str, tokenizer=None) -> RolloutSample:
    if not isinstance(obj, dict):
        raise RolloutRecordError(f"{where}: a rollout record is a JSON object")
    rewards = obj.get("rewards")
    if not isinstance(rewards, dict) or not isinstance(rewards.get("outcome"), (int, float)):
        raise RolloutRecordError(f"{where}: needs rewards.outcome (a number)")
    process = rewards.get("process")
    if process is not None and not isinstance(process, (int, float)):
        raise RolloutRecordError(f"{where}: rewards.process must be a number or null")
    pid = obj.get("group_id", obj.get("prompt_id"))
    if pid is None:
        raise RolloutRecordError(f"{where}: needs prompt_id (samples of a prompt form a group)")
    logprobs = None
    if "tokens" in obj:
        tokens = np.asarray(obj["tokens"], dtype=np.int64)
        mask = np.asarray(obj.get("loss_mask", []), dtype=np.float32)
        if mask.shape != tokens.shape:
            raise RolloutRecordError(f"{where}: loss_mask must have one entry per token")
        if obj.get("logprobs") is not None:
            logprobs = np.asarray(obj["logprobs"], dtype=np.float32)
            if logprobs.shape != tokens.shape:
                raise RolloutRecordError(f"{where}: logprobs must have one entry per token")
    elif "messages" in obj:
        if tokenizer is None:
            raise RolloutRecordError(f"{where}: record has messages but no tokens; set "
                                     "grpo.tokenizer so the trainer can render it")
        from megatron_a1.data.render import render

        try:
            (doc,) = render(obj["messages"], obj.get("tools"), tokenizer=tokenizer,
                            policy="whole")
        except ValueError as exc:
            raise RolloutRecordError(f"{where}: {exc}") from None
        tokens = np.asarray(doc.tokens, dtype=np.int64)
        mask = np.asarray(doc.loss_mask, dtype=np.float32)
    else:
        raise RolloutRecordError(f"{where}: needs tokens + loss_mask, or messages")
    if not mask[1:].any():
        raise RolloutRecordError(f"{where}: no sampled token to train on")
    return RolloutSample(str(pid), str(obj.get("domain", "default")), tokens, mask, logprobs,
                         float(rewards["outcome"]), None if process is None else float(process),
                         where)


def read_rollout_groups(path: str, tokenizer=None) -> tuple[list[list[RolloutSample]], list[str]]:
    """Groups in order of first appearance, and the errors of skipped bad records."""
    groups: dict[str, list[RolloutSample]] = {}
    errors = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                sample = parse_rollout(json.loads(line), where, tokenizer)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: invalid JSON ({exc.msg})")
                continue
            except RolloutRecordError as exc:
                errors.append(str(exc))
                continue
            groups.setdefault(sample.prompt_id, []).append(sample)
    return list(groups.values()), errors


def assign_advantages(group: list[RolloutSample], process_weight: float | None) -> None:
    """Set ``advantage`` on each sample of one group (DESIGN.md §1)."""
    outcome = torch.tensor([s.outcome for s in group], dtype=torch.float64)
    ids = torch.zeros(len(group), dtype=torch.long)
    if process_weight is not None and all(s.process is not None for s in group):
        process = torch.tensor([s.process for s in group], dtype=torch.float64)
        adv = asymmetric_tool_advantages(outcome, process, ids, process_weight)
    else:
        adv = group_advantages(outcome, ids)
    for s, a in zip(group, adv.tolist()):
        s.advantage = a


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per bin, first-fit decreasing (ties: lower index first); deterministic."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def make_micro_batch(samples: list[RolloutSample], pad_to_multiple: int | None = None) -> dict:
    """One THD pack of rollout samples with per-label-position ``advantages`` and
    ``old_logprobs`` (NaN where the record had none) next to the usual keys."""
    if not samples:  # an empty pack keeps every DP rank at the same micro-batch count
        samples = [RolloutSample("", "default", np.zeros(2, np.int64), np.zeros(2, np.float32),
                                 None, 0.0, None, "padding")]
    packed = build_sample([s.tokens for s in samples], [s.mask for s in samples])
    packed.update(dataset_id=0, domains=[s.domain for s in samples],
                  doc_ids=list(range(len(samples))))
    batch = collate_thd([packed], pad_to_multiple=pad_to_multiple)
    total = batch["tokens"].shape[1]
    adv = torch.zeros(total)
    old = torch.full((total,), float("nan"))
    offset = 0
    for s in samples:
        n = len(s.tokens)
        adv[offset:offset + n] = s.advantage
        if s.logprobs is not None:  # label position t predicts token t+1
            old[offset:offset + n - 1] = torch.from_numpy(s.logprobs[1:])
        offset += n
    batch["advantages"], batch["old_logprobs"] = adv, old
    return batch


@dataclass(kw_only=True)
class StepRollouts:
    micro_batches: list[dict]
    """This DP rank's packs."""
    samples: list[RolloutSample]
    """Every kept sample of the step (all ranks)."""
    groups_read: int
    groups_kept: int
    truncated: int


class RolloutGroupSource:
    """Offline GRPO input: a rollout JSONL file read group by group, cycling over epochs."""

    def __init__(self, path: str, *, prompts_per_step: int, max_seq_len: int,
                 process_weight: float | None, dynamic_sampling: bool, dp_rank: int, dp_size: int,
                 tokenizer=None, pad_to_multiple: int | None = None):
        self.groups, self.errors = read_rollout_groups(path, tokenizer)
        if not self.groups:
            raise RolloutRecordError(f"{path}: no usable rollout record"
                                     + (f" ({self.errors[0]} ...)" if self.errors else ""))
        self.path, self.prompts_per_step, self.max_seq_len = path, prompts_per_step, max_seq_len
        self.process_weight, self.dynamic_sampling = process_weight, dynamic_sampling
        self.dp_rank, self.dp_size, self.pad = dp_rank, dp_size, pad_to_multiple
        self.tokenizer = tokenizer
        for g in self.groups:
            assign_advantages(g, process_weight)
        self.kept = [self._keep(g) for g in self.groups]
        if not any(self.kept):
            raise RolloutRecordError(f"{path}: every group has equal rewards (or one sample); "
                                     "there is nothing to learn (grpo.dynamic_sampling drops "
                                     "them all)")

    def _keep(self, group: list[RolloutSample]) -> bool:
        return not self.dynamic_sampling or any(s.advantage != 0 for s in group)

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(sum(self.kept) / self.prompts_per_step))

    def next_step(self, cursor: int) -> tuple[StepRollouts, int]:
        """The step starting at group ``cursor``; returns it and the next cursor."""
        chosen, read = [], 0
        while len(chosen) < self.prompts_per_step:
            i = (cursor + read) % len(self.groups)
            read += 1
            if self.kept[i]:
                chosen.append(self.groups[i])
        return self.pack(chosen, read), cursor + read

    def pack(self, groups: list[list[RolloutSample]], groups_read: int) -> StepRollouts:
        return pack_step(groups, groups_read, max_seq_len=self.max_seq_len,
                         dp_rank=self.dp_rank, dp_size=self.dp_size, pad_to_multiple=self.pad)


def pack_step(groups: list[list[RolloutSample]], groups_read: int, *, max_seq_len: int,
              dp_rank: int, dp_size: int, pad_to_multiple: int | None = None) -> StepRollouts:
    """Pack a step's groups first-fit decreasing into ``max_seq_len`` packs (a longer sample
    keeps its head and counts as truncated), padded with empty packs to a multiple of the DP
    size; rank ``r`` takes packs ``r, r + dp, ...``."""
    samples, truncated = [], 0
    for g in groups:
        for s in g:
            if len(s.tokens) > max_seq_len:  # keep the head; the tail is not trained
                s = RolloutSample(**{**s.__dict__, "tokens": s.tokens[:max_seq_len],
                                     "mask": s.mask[:max_seq_len],
                                     "logprobs": None if s.logprobs is None
                                     else s.logprobs[:max_seq_len]})
                truncated += 1
            samples.append(s)
    bins = pack_first_fit([len(s.tokens) for s in samples], max_seq_len)
    per_rank = math.ceil(len(bins) / dp_size)
    bins += [[] for _ in range(per_rank * dp_size - len(bins))]
    micro = [make_micro_batch([samples[i] for i in b], pad_to_multiple)
             for b in bins[dp_rank::dp_size]]
    return StepRollouts(micro_batches=micro, samples=samples, groups_read=groups_read,
                        groups_kept=len(groups), truncated=truncated)
