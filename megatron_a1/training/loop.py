"""The training loop: one screen, every stage.

``run(cfg)`` builds the runtime, model, optimizer, scheduler and data; resumes if a checkpoint
exists; then repeats ``train_step`` (megatron-core schedules + distributed optimizer) with the
stage's ``forward_step``, logging, checkpointing every ``save_interval`` steps and on SIGTERM,
and skipping non-finite steps (stopping after ``max_consecutive_nonfinite`` in a row).
"""
from __future__ import annotations

import logging
import math
import signal
import time

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_a1.configs import to_dict
from megatron_a1.runtime import destroy, initialize
from megatron_a1.training import checkpoint as ckpt
from megatron_a1.training.config import TrainConfig
from megatron_a1.training.engine import setup_ddp_and_optimizer, train_step
from megatron_a1.training.logger import MetricsLogger
from megatron_a1.training.model_setup import build_model_chunks
from megatron_a1.training.sources import make_source
from megatron_a1.training.stages import make_stage

log = logging.getLogger("megatron_a1.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient norm. Raised on every rank at
    the same step with the process groups still up (the caller tears them down)."""


def _optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, use_distributed_optimizer=o.distributed,
        bf16=cfg.model.bf16, params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
    )


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )


class _Preemption:
    """SIGTERM (Slurm preemption) sets a flag; the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self) -> None:
        """Give SIGTERM back to whoever handled it before the run."""
        signal.signal(signal.SIGTERM, self._previous)

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def latest_is(cfg: TrainConfig, state) -> bool:
    """True when the newest checkpoint on disk already is this iteration."""
    latest = ckpt.latest_checkpoint(cfg.checkpoint.dir)
    return latest is not None and latest.endswith(f"iter_{state.iteration:07d}")


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns a summary (final step, last loss, checkpoint path)."""
    rt = initialize(cfg.parallel, seed=cfg.train.seed)
    t, c = cfg.train, cfg.checkpoint
    lock = ckpt.lock_dir(c.dir) if c.dir else None  # a second job on c.dir stops here
    model, info = build_model_chunks(cfg, rt)
    ddp, optimizer = setup_ddp_and_optimizer(model, _optimizer_config(cfg))

    source = make_source(cfg, rt, ddp)
    total_steps = source.total_steps
    scheduler = _scheduler(cfg, optimizer, total_steps)

    state = ckpt.TrainerState(config=to_dict(cfg))
    resumed = ckpt.resume(c.dir, ddp, optimizer, seed=t.seed, iteration=c.load_iteration,
                          load_optimizer=c.load_optimizer, load_rng=c.load_rng,
                          strict=c.strict_load) if c.dir and c.resume else None
    if resumed:
        latest, state = resumed
        if state.scheduler is not None:  # else weights only: the fresh schedule starts over
            scheduler.load_state_dict(state.scheduler)
        log.info("resumed from %s at step %d%s", latest, state.iteration,
                 "" if c.load_optimizer else " (weights only: fresh optimizer and schedule)")
    elif cfg.model.init_from:
        ckpt.load_model_weights(ckpt.resolve_checkpoint(cfg.model.init_from), ddp)
        optimizer.reload_model_params()

    stage = make_stage(cfg, rt, info, ddp)
    source.start(state)
    logger = MetricsLogger(cfg, rt, info, model)
    preempt, nonfinite_run, saved_at = _Preemption(), 0, None

    def save() -> int:
        source.before_save(state)  # rollouts in flight go into the checkpoint
        state.scheduler = scheduler.state_dict()
        # before the first step the optimizer has no state: the checkpoint holds weights only
        path = ckpt.save_checkpoint(cfg.checkpoint.dir, ddp, optimizer if state.iteration else None,
                                    state, keep_last=c.keep_last,
                                    reshardable_optimizer=c.reshardable_optimizer)
        logger.info(f"saved {path}")
        return state.iteration

    while state.iteration < total_steps:
        step = source.next_step(state)
        micro = step.micro_batches
        stage.prepare(micro)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        start = time.perf_counter()
        result = train_step(stage.forward_step, iter(micro), ddp, optimizer,
                            num_microbatches=len(micro), seq_length=cfg.data.max_seq_len,
                            micro_batch_size=1)
        elapsed = time.perf_counter() - start
        if result.skipped:
            nonfinite_run += 1
            what = (f"loss {result.loss}" if not math.isfinite(result.loss) else
                    f"gradient norm {result.grad_norm} (loss {result.loss:.4g})")
            if logger.is_main:
                log.warning("step %d: non-finite %s, update skipped (%d in a row)",
                            state.iteration + 1, what, nonfinite_run)
            if nonfinite_run >= t.max_consecutive_nonfinite:
                # every rank saw the same global loss and stops here, without a checkpoint of
                # a run gone bad; the caller says why once, then destroys the process groups
                source.close()
                logger.close()
                preempt.close()
                if lock is not None:
                    lock.release()
                raise NonFiniteLossError(
                    f"step {state.iteration + 1}: {nonfinite_run} non-finite steps in a row "
                    f"(last: {what}; their updates were skipped); lower optim.lr (now "
                    f"{cfg.optim.lr:g}), check the data, or raise train.max_consecutive_nonfinite "
                    f"({t.max_consecutive_nonfinite})")
        else:
            nonfinite_run = 0
            scheduler.step(1)
        state.iteration += 1
        stage.finish(step)
        logger.step(state, result, micro, elapsed, lr, total_steps, {**stage.metrics, **step.info})

        preempted = preempt.any_rank()
        exiting = preempted or bool(t.exit_interval and state.iteration % t.exit_interval == 0)
        due = cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0
        if cfg.checkpoint.dir and (due or exiting):
            saved_at = save()
        if source.wants_weights(state) and not exiting:  # a server samples the next step
            if saved_at != state.iteration:
                saved_at = save()
            source.push_weights(ckpt.latest_checkpoint(cfg.checkpoint.dir), state)
        if exiting:
            logger.info(("SIGTERM received" if preempted else "train.exit_interval reached")
                        + ": checkpoint written, exiting")
            break

    # The end of the run is always on disk (with train_steps=0: the initial weights, a common
    # starting point for other layouts), unless this very iteration already is.
    if cfg.checkpoint.dir and saved_at != state.iteration and not latest_is(cfg, state):
        save()

    source.close()
    summary = {"step": state.iteration, "loss": logger.last_loss, "checkpoint_dir": cfg.checkpoint.dir,
               "losses": logger.history}
    logger.close()
    preempt.close()
    if lock is not None:
        lock.release()
    destroy()
    return summary
