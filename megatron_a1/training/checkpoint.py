"""Atomic, resumable checkpoints on megatron-core's ``dist_checkpointing``.

Layout of ``<dir>``::

    iter_0000040/            one complete checkpoint (model + optimizer shards, dist format)
        trainer_state.pt     iteration, consumed samples, scheduler, config (rank 0)
        rng/rank_00003.pt    each rank's RNG states (python, numpy, torch, megatron tracker)
    latest                   text file naming the newest complete checkpoint

A checkpoint is written into ``iter_N.tmp`` and renamed to ``iter_N`` only after every rank has
finished, then ``latest`` is replaced atomically (``os.replace``), then older checkpoints beyond
``keep_last`` are deleted. A crash at any point leaves the previous checkpoint intact and
``latest`` pointing at a complete one; a stale ``.tmp`` is ignored and removed by the next save.

The distributed optimizer state is saved ``dp_reshardable``: a run may resume with another
data-parallel size (same TP/PP/EP). RNG states are restored when the world size is unchanged;
otherwise every rank re-seeds from ``seed + iteration`` (logged), which does not affect runs
without dropout.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

log = logging.getLogger(__name__)
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    scheduler: dict | None = None
    config: dict | None = None
    has_optimizer: bool = True
    """False for a weights-only checkpoint (e.g. the initial weights, before any step)."""
    data: dict = field(default_factory=dict)
    """The data source's resume point beyond ``consumed_samples`` (GRPO: ``group_cursor``)."""


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint in ``ckpt_dir`` (None if there is none)."""
    marker = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{marker} names {name}, which does not exist: the checkpoint "
                                "directory was modified by hand; point `latest` at a complete "
                                "iter_* directory")
    return path


def _sharded_state(model: list, optimizer, *, is_loading: bool) -> dict:
    chunk_sds = [chunk.sharded_state_dict() for chunk in model]
    # virtual pipeline: one entry per chunk (megatron-core's convention); keys carry global
    # layer numbers, so the union is the whole model for the optimizer
    state = ({"model": chunk_sds[0]} if len(model) == 1
             else {f"model{i}": sd for i, sd in enumerate(chunk_sds)})
    model_sd = {k: v for sd in chunk_sds for k, v in sd.items()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPT_META
        )
    return state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_checkpoint(ckpt_dir: str, model: list, optimizer, state: TrainerState,
                    keep_last: int = 2) -> str:
    """Write checkpoint ``iter_<state.iteration>`` atomically; return its path.

    ``optimizer=None`` writes a weights-only checkpoint (the optimizer has no state before the
    first step).
    """
    rank = dist.get_rank()
    state.has_optimizer = optimizer is not None
    final = os.path.join(ckpt_dir, _iter_name(state.iteration))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier()

    sharded = _sharded_state([_unwrap(c) for c in model], optimizer, is_loading=False)
    dist_checkpointing.save(sharded, tmp, content_metadata=_OPT_META)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        torch.save(vars(state), os.path.join(tmp, "trainer_state.pt"))
    dist.barrier()  # every rank's shards are on disk

    if rank == 0:
        if os.path.exists(final):  # re-saving the same iteration (e.g. SIGTERM right after)
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = os.path.join(ckpt_dir, "latest.tmp")
        with open(marker_tmp, "w") as f:
            f.write(_iter_name(state.iteration) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(ckpt_dir, "latest"))
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _prune(ckpt_dir: str, keep_last: int) -> None:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("iter_"))
    complete = [n for n in names if not n.endswith(".tmp")]
    for name in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    for name in names:
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load_checkpoint(path: str, model: list, optimizer, *, seed: int) -> TrainerState:
    """Restore model, optimizer (if given), RNG and trainer state from checkpoint ``path``."""
    chunks = [_unwrap(c) for c in model]
    state = TrainerState(**torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False))
    if not state.has_optimizer:
        optimizer = None
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    loaded = _load(path, chunks, optimizer)
    if optimizer is not None:
        # no_grad: with fp32 weights the distributed optimizer's main params are views of the
        # model's parameters, which autograd forbids copying into in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)

    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    saved_world = len(os.listdir(os.path.join(path, "rng")))
    if saved_world == dist.get_world_size() and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("world size changed (%d -> %d): re-seeding RNGs from seed + iteration",
                    saved_world, dist.get_world_size())
        from megatron_a1.runtime import seed_everything

        seed_everything(seed + state.iteration,
                        pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    return state


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors before loading into them.

    torch's Adam creates its state lazily at the first step, and megatron-core derives the
    loading layout from that state. A fresh optimizer therefore takes one zero-gradient step
    first (megatron-core's ``DistributedOptimizer._init_optimizer_states_with_dummy_values``);
    every state tensor, and the weights, are then replaced by the checkpoint's.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Set every parameter's Adam ``step`` to the checkpoint's iteration count.

    Without Apex/TE (torch's AdamW: CPU runs) megatron-core 0.19.2 saves the step in the param
    groups (``group["step"]``), but after ``DistributedOptimizer.load_state_dict`` into a fresh
    optimizer the per-parameter ``state["step"]`` tensors keep the value of the state they were
    materialised with, and when it does set them it shares one tensor between all parameters
    (torch increments it in place, once per parameter). Either skews Adam's bias correction, so
    each parameter gets its own tensor holding the saved step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and torch.is_tensor(st.get("step")):
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype)


def load_model_weights(path: str, model: list) -> None:
    """Load only the model weights of a checkpoint (e.g. a teacher, or SFT → OPD init)."""
    _load(path, [_unwrap(c) for c in model], None)


def _load(path: str, chunks: list, optimizer) -> dict:
    """Read the checkpoint into the model chunks; return what was loaded (optimizer state too)."""
    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True), path)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key])
    return loaded


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])
