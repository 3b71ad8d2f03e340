"""Atomic, resumable checkpoints on megatron-core's ``dist_checkpointing``, any layout to any.

Layout of ``<dir>``::

    iter_0000040/            one complete checkpoint (model + optimizer shards, dist format)
        trainer_state.pt     iteration, consumed samples, scheduler, config, layout (rank 0)
        rng/rank_00003.pt    each rank's RNG states (python, numpy, torch, megatron tracker)
        manifest.json        every file of the checkpoint with its size (written last)
    latest                   text file naming the newest complete checkpoint
    lock.json                the job using this directory (host, pid, start time)

**Atomic.** A checkpoint is written into ``iter_N.tmp`` and renamed to ``iter_N`` only after
every rank has finished, then ``latest`` is replaced atomically (``os.replace``), then older
checkpoints beyond ``keep_last`` are deleted. A crash at any point leaves the previous checkpoint
intact and ``latest`` pointing at a complete one; a stale ``.tmp`` is removed by the next save.

**Any layout.** Model tensors are stored under layout-free keys with their global shapes, and
the distributed optimizer's state in megatron-core's ``fully_reshardable`` format (one tensor per
parameter state, keyed like the parameter), so a run saved under one TP/PP/EP/DP layout resumes
under another with its Adam moments. Saving gathers each data-parallel group's optimizer shards
into host memory (about 12 bytes per parameter of the rank's model-parallel shard, on every
rank); ``reshardable_optimizer=False`` saves megatron-core's ``dp_reshardable`` buckets instead
(no gather; resumes only under the same TP/PP/EP). Loading reads the format from the
checkpoint. The optimizer's non-tensor state (param groups) is megatron-core's per-layout
structure (with EP > 1 experts get an optimizer of their own); loading therefore keeps the
current optimizer's structure and hyper-parameters and takes the saved Adam step count.

**Resume** (:func:`resume`) picks ``latest`` (or ``iter_<load_iteration>``), checks it against
its manifest (a missing or truncated file is named), falls back to the newest complete older
checkpoint with a warning unless ``strict``, and loads the model, then the optimizer (unless
weights only: a fresh optimizer and scheduler), then each rank's RNG states when the layout is
unchanged (else every rank re-seeds from ``seed + iteration``, which does not affect runs without
dropout). Rank 0 chooses and broadcasts the choice, so every rank loads the same checkpoint;
``latest`` then names it (newer checkpoints are replaced as training reaches their iterations).

**Lock.** :func:`lock_dir` writes ``lock.json`` with O_EXCL; a second job on the directory gets
an error naming the holder. A lock left by a dead process on this host, or by an earlier run of
the same Slurm job (a requeue), is taken over with a warning.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedBase

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
LOCK = "lock.json"
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used, or the checkpoint directory is held by another job."""


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
    layout: dict | None = None
    """The parallel layout that saved it (world size, TP, PP, EP, ...): RNG states are restored
    only under the same layout."""


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _metadata(reshardable: bool) -> dict:
    """``sharded_state_dict`` metadata (megatron-core's content-versioning flags)."""
    return {"distrib_optim_sharding_type": "fully_reshardable" if reshardable else "dp_reshardable",
            "chained_optim_avoid_prefix": True, "singleton_local_shards": False}


_LEGACY_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""What checkpoints written before content metadata recorded the format hold."""


def _layout() -> dict:
    ps = parallel_state
    return {"world_size": dist.get_world_size(),
            "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_parallel": ps.get_virtual_pipeline_model_parallel_world_size(),
            "context_parallel": ps.get_context_parallel_world_size(),
            "expert_parallel": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel": ps.get_expert_tensor_parallel_world_size()}


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> str:
    """``path`` itself if it is one checkpoint (``iter_*``), else the one its ``latest`` names."""
    if os.path.isfile(os.path.join(path, "latest")):
        return latest_checkpoint(path)
    return path


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the checkpoint ``<ckpt_dir>/latest`` names (None if there is no ``latest``)."""
    marker = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{marker} names {name}, which does not exist: the checkpoint "
                              "directory was modified by hand; point `latest` at a complete "
                              "iter_* directory")
    return path


def _iterations(ckpt_dir: str) -> list[int]:
    """Iterations of the ``iter_*`` directories in ``ckpt_dir`` (not ``.tmp``), ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(ckpt_dir) if (m := _ITER.match(n)))


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint ``path`` cannot be loaded (naming the file), or None if it is complete.

    Checks every file against the sizes in its manifest (a missing, truncated or overwritten
    file), and that the trainer state reads. Checkpoints written before manifests existed are
    checked for their fixed files only.
    """
    manifest = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as exc:
            return f"{manifest} cannot be read ({type(exc).__name__}: {exc})"
    else:
        files = {n: None for n in ("metadata.json", ".metadata", TRAINER_STATE)}
    for name, size in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if size is not None and os.path.getsize(file) != size:
            return (f"{file} has {os.path.getsize(file)} bytes, its manifest says {size} "
                    "(truncated or overwritten)")
    try:
        torch.load(os.path.join(path, TRAINER_STATE), weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is the same problem
        return f"{os.path.join(path, TRAINER_STATE)} cannot be read ({type(exc).__name__}: {exc})"
    return None


def _choose(ckpt_dir: str, iteration: int | None, strict: bool) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from and the warnings about skipped ones (one process)."""
    available = _iterations(ckpt_dir)
    if iteration is not None:
        path = os.path.join(ckpt_dir, _iter_name(iteration))
        if iteration not in available:
            raise CheckpointError(
                f"checkpoint.load_iteration={iteration}: {path} does not exist; available: "
                f"{[_iter_name(i) for i in available] or 'none'}")
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint.load_iteration={iteration}: {path} is incomplete "
                                  f"or corrupt: {problem}")
        return path, []
    warnings = []
    try:
        latest = latest_checkpoint(ckpt_dir)
    except CheckpointError as exc:
        if strict or not available:
            raise
        warnings.append(str(exc))
        latest = None
    if latest is None and not available:
        return None, []
    # no marker but iter_* directories: a crash between the rename and the marker
    newest = available[-1]
    if latest is not None:
        if not _ITER.match(os.path.basename(latest)):
            raise CheckpointError(f"{ckpt_dir}/latest names {os.path.basename(latest)}, not an "
                                  "iter_NNNNNNN checkpoint: set checkpoint.load_iteration")
        newest = int(_ITER.match(os.path.basename(latest)).group(1))
    for it in [newest] + [i for i in reversed(available) if i < newest]:
        path = os.path.join(ckpt_dir, _iter_name(it))
        problem = checkpoint_problem(path)
        if problem is None:
            if warnings:
                warnings.append(f"falling back to {path}")
            return path, warnings
        if strict:
            raise CheckpointError(
                f"{path} is incomplete or corrupt: {problem}. checkpoint.strict_load=true: not "
                "falling back to an older checkpoint (set checkpoint.load_iteration to choose "
                "one, or checkpoint.strict_load=false)")
        warnings.append(f"{path} is incomplete or corrupt: {problem}")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(warnings))


def _choose_and_mark(ckpt_dir: str, iteration: int | None, strict: bool):
    """:func:`_choose`, then ``latest`` names the chosen checkpoint: the run continues from it
    (newer ones, corrupt or left behind by ``load_iteration``, are replaced as training reaches
    their iterations)."""
    path, warnings = _choose(ckpt_dir, iteration, strict)
    if path is not None and path != _latest_or_none(ckpt_dir):
        newer = [_iter_name(i) for i in _iterations(ckpt_dir)
                 if i > int(_ITER.match(os.path.basename(path)).group(1))]
        _point_latest(ckpt_dir, os.path.basename(path))
        warnings.append(f"{ckpt_dir}/latest now names {os.path.basename(path)}"
                        + (f"; the newer {', '.join(newer)} will be replaced as training "
                           "reaches their iterations" if newer else ""))
    return path, warnings


def _latest_or_none(ckpt_dir: str) -> str | None:
    try:
        return latest_checkpoint(ckpt_dir)
    except CheckpointError:
        return None


def _on_rank0(fn, *args):
    """``fn(*args)`` on rank 0, its result (or its CheckpointError) on every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn(*args))]
        except CheckpointError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


# ----------------------------------------------------------------------------------------------
# Lock
# ----------------------------------------------------------------------------------------------
@dataclass
class DirLock:
    """``lock.json`` of a checkpoint directory, held by rank 0 of this job."""

    path: str
    owner: dict

    def release(self) -> None:
        """Remove the lock if it is still this process's (idempotent)."""
        try:
            with open(self.path) as f:
                if json.load(f) != self.owner:
                    return
            os.remove(self.path)
        except (OSError, ValueError):
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _acquire(ckpt_dir: str) -> DirLock:
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, LOCK)
    owner = {"host": socket.gethostname(), "pid": os.getpid(),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "job": os.environ.get("SLURM_JOB_ID")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age_s, held = 0.0, {}
            try:
                age_s = time.time() - os.path.getmtime(path)
                with open(path) as f:
                    held = json.load(f)
            except FileNotFoundError:  # released meanwhile
                continue
            except (OSError, ValueError):
                pass
            held = held if isinstance(held, dict) else {}
            stale = _stale_reason(held, owner, age_s)
            if stale is None:
                raise CheckpointError(
                    f"checkpoint.dir {ckpt_dir} is in use by another job: {path} is held by pid "
                    f"{held.get('pid')} on {held.get('host')} since {held.get('time')}"
                    + (f" (Slurm job {held['job']})" if held.get("job") else "") +
                    f". Use another checkpoint.dir, or, if that job is no longer running, "
                    f"delete {path}") from None
            if stale:
                log.warning("taking over %s: %s", path, stale)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        lock = DirLock(path, owner)
        atexit.register(lock.release)
        return lock
    raise CheckpointError(f"{path}: another job took the lock at the same time; retry")


def _stale_reason(held: dict, me: dict, age_s: float) -> str | None:
    """Why the lock ``held`` may be taken over ("" silently), or None if its holder may live."""
    if not isinstance(held.get("pid"), int) or held["pid"] <= 0:
        # being written this very moment, or left half-written by a crash long ago
        return None if age_s < 60 else "the lock file is unreadable and over a minute old"
    if held.get("host") == me["host"] and held.get("pid") == me["pid"]:
        return ""  # an earlier run in this very process
    if held.get("host") == me["host"] and not _pid_alive(held["pid"]):
        return f"its process {held.get('pid')} (started {held.get('time')}) is no longer running"
    if held.get("job") and held.get("job") == me["job"]:
        return f"it is from an earlier run of this Slurm job {me['job']} (requeued)"
    return None


def lock_dir(ckpt_dir: str) -> DirLock | None:
    """Take ``<ckpt_dir>/lock.json`` for this job (rank 0 holds it; every rank gets the error).

    Returns the lock on rank 0 (release it at the end of the run), None on other ranks.
    """
    lock = None
    if dist.get_rank() == 0:
        try:
            lock = _acquire(ckpt_dir)
            box = [None]
        except CheckpointError as exc:
            box = [str(exc)]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    return lock


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------
def _sharded_state(model: list, optimizer, *, is_loading: bool, metadata: dict) -> dict:
    chunk_sds = [chunk.sharded_state_dict(metadata=dict(metadata)) for chunk in model]
    # virtual pipeline: one entry per chunk (megatron-core's convention); keys carry global
    # layer numbers, so the union is the whole model for the optimizer
    state = ({"model": chunk_sds[0]} if len(model) == 1
             else {f"model{i}": sd for i, sd in enumerate(chunk_sds)})
    model_sd = {k: v for sd in chunk_sds for k, v in sd.items()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(metadata)
        )
    return state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_checkpoint(ckpt_dir: str, model: list, optimizer, state: TrainerState,
                    keep_last: int = 2, *, reshardable_optimizer: bool = True) -> str:
    """Write checkpoint ``iter_<state.iteration>`` atomically; return its path.

    ``optimizer=None`` writes a weights-only checkpoint (the optimizer has no state before the
    first step). ``reshardable_optimizer``: see the module docstring.
    """
    rank = dist.get_rank()
    state.has_optimizer = optimizer is not None
    state.layout = _layout()
    final = os.path.join(ckpt_dir, _iter_name(state.iteration))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # empty: dist_checkpointing warns about any directory with content
    dist.barrier()

    meta = _metadata(reshardable_optimizer)
    sharded = _sharded_state([_unwrap(c) for c in model], optimizer, is_loading=False,
                             metadata=meta)
    dist_checkpointing.save(sharded, tmp, content_metadata=meta)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        torch.save(vars(state), os.path.join(tmp, TRAINER_STATE))
    dist.barrier()  # every rank's files are on disk

    if rank == 0:
        _write_manifest(tmp)
        if os.path.exists(final):  # re-saving the same iteration (e.g. SIGTERM right after)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(ckpt_dir, _iter_name(state.iteration))
        _prune(ckpt_dir, keep_last, state.iteration)
    dist.barrier()
    return final


def _point_latest(ckpt_dir: str, name: str) -> None:
    """Replace ``<ckpt_dir>/latest`` atomically with one naming ``name``."""
    marker_tmp = os.path.join(ckpt_dir, "latest.tmp")
    with open(marker_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker_tmp, os.path.join(ckpt_dir, "latest"))


def _write_manifest(path: str) -> None:
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def _prune(ckpt_dir: str, keep_last: int, saved: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``saved`` (newer ones, left by a run
    resumed from an older iteration, are overwritten when training reaches them)."""
    older = [i for i in _iterations(ckpt_dir) if i <= saved]
    for it in older[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(ckpt_dir, _iter_name(it)), ignore_errors=True)
    for name in os.listdir(ckpt_dir):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
def resume(ckpt_dir: str, model: list, optimizer, *, seed: int, iteration: int | None = None,
           load_optimizer: bool = True, load_rng: bool = True,
           strict: bool = False) -> tuple[str, TrainerState] | None:
    """Load the checkpoint to resume from (see the module docstring); None if there is none.

    ``iteration``: ``iter_<iteration>`` instead of the newest. ``load_optimizer=False``: model
    weights and trainer state only; the returned state has no scheduler (keep a fresh one).
    ``strict``: an incomplete or corrupt newest checkpoint is an error instead of a fallback.
    """
    path, warnings = _on_rank0(_choose_and_mark, ckpt_dir, iteration, strict)
    for w in warnings if dist.get_rank() == 0 else []:
        log.warning(w)
    if path is None:
        return None
    state = load_checkpoint(path, model, optimizer if load_optimizer else None, seed=seed,
                            load_rng=load_rng)
    if not load_optimizer:
        state.scheduler = None
    return path, state


def load_checkpoint(path: str, model: list, optimizer, *, seed: int,
                    load_rng: bool = True) -> TrainerState:
    """Restore model, optimizer (if given and saved), RNG and trainer state from ``path``.

    Without optimizer state loaded, the optimizer's main parameters are refreshed from the
    loaded weights (bf16 runs keep fp32 copies)."""
    chunks = [_unwrap(c) for c in model]
    state = TrainerState(**torch.load(os.path.join(path, TRAINER_STATE), weights_only=False))
    with_optimizer = optimizer is not None and state.has_optimizer
    if with_optimizer:
        _materialise_optimizer_state(optimizer)
    try:
        loaded, optimizer_state = _load(path, chunks, optimizer if with_optimizer else None)
    except CheckpointError:
        raise
    except Exception as exc:  # the file-level check passed: name the checkpoint at least
        raise CheckpointError(f"loading {path} failed: {type(exc).__name__}: {exc}") from exc
    if with_optimizer:
        # no_grad: with fp32 weights the distributed optimizer's main params are views of the
        # model's parameters, which autograd forbids copying into in place.
        with torch.no_grad():
            dropped = _load_optimizer_state(optimizer, optimizer_state)
        _restore_adam_steps(optimizer, dropped)
    elif optimizer is not None:
        optimizer.reload_model_params()
    _restore_rng(path, state, seed, load_rng)
    return state


def _restore_rng(path: str, state: TrainerState, seed: int, load_rng: bool) -> None:
    rng_dir = os.path.join(path, "rng")
    rng_file = os.path.join(rng_dir, f"rank_{dist.get_rank():05d}.pt")
    if state.layout is not None:
        same = state.layout == _layout()
    else:  # older checkpoints record no layout
        same = len(os.listdir(rng_dir)) == dist.get_world_size()
    if load_rng and same and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
        return
    if dist.get_rank() == 0:
        why = "checkpoint.load_rng=false" if not load_rng else (
            f"parallel layout changed ({state.layout or 'unrecorded'} -> {_layout()})")
        log.warning("%s: re-seeding RNGs from seed + iteration", why)
    from megatron_a1.runtime import seed_everything

    seed_everything(seed + state.iteration,
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank())


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


def _load_optimizer_state(optimizer, state: dict) -> set:
    """``optimizer.load_state_dict(state)``, sub-optimizer by sub-optimizer; returns the
    parameters whose per-parameter Adam ``step`` was removed (see below).

    megatron-core 0.19.2's ``fully_reshardable`` load copies every tensor of a parameter's
    optimizer state from the checkpoint, which stores no per-parameter step, so with torch's
    Adam (no Apex/TE: CPU runs), whose state holds one, it fails with KeyError 'step'. Such a
    sub-optimizer loads its param groups first, then its tensors without the ``step`` entries;
    :func:`_restore_adam_steps` puts them back with the saved value.
    """
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(subs) == 1 else [state[k] for k in sorted(state)]
    if len(parts) != len(subs):
        raise CheckpointError(f"optimizer state has {len(parts)} parts for {len(subs)} optimizers")
    dropped = set()
    for opt, part in zip(subs, parts):
        inner = getattr(opt, "optimizer", None)
        if part.get("param_state_sharding_type") != "fully_reshardable":
            opt.load_state_dict(part)
            continue
        opt.load_state_dict({k: v for k, v in part.items() if k != "param_state"})
        for p, st in getattr(inner, "state", {}).items():
            if torch.is_tensor(st.get("step")):
                del st["step"]
                dropped.add(p)
        opt.load_parameter_state_from_fully_reshardable(part["param_state"])
    return dropped


def _restore_adam_steps(optimizer, dropped: set) -> None:
    """Set every parameter's Adam ``step`` to the checkpoint's iteration count.

    Without Apex/TE (torch's AdamW: CPU runs) megatron-core 0.19.2 saves the step in the param
    groups (``group["step"]``), but after ``DistributedOptimizer.load_state_dict`` into a fresh
    optimizer the per-parameter ``state["step"]`` tensors keep the value of the state they were
    materialised with, and when it does set them it shares one tensor between all parameters
    (torch increments it in place, once per parameter). Either skews Adam's bias correction, so
    each parameter gets its own tensor holding the saved step (``dropped``: the parameters
    whose step :func:`_load_optimizer_state` removed).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st is not None and (p in dropped or torch.is_tensor(st.get("step"))):
                    st["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_model_weights(path: str, model: list) -> None:
    """Load only the model weights of a checkpoint (e.g. a teacher, or SFT → OPD init)."""
    _load(path, [_unwrap(c) for c in model], None)


def _load(path: str, chunks: list, optimizer) -> tuple[dict, dict | None]:
    """Read the checkpoint into the model chunks; return what was loaded and the optimizer's
    state dict to load (this layout's structure, the checkpoint's tensors and Adam step)."""
    meta = dist_checkpointing.load_content_metadata(path) or _LEGACY_METADATA
    request = _sharded_state(chunks, optimizer, is_loading=True, metadata=meta)
    wanted = _copy_structure(request.get("optimizer"))
    loaded = dist_checkpointing.load(request, path)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key])
    if optimizer is None:
        return loaded, None
    optimizer_state = _take_sharded(wanted, loaded["optimizer"])
    step = _saved_step(loaded["optimizer"])
    if step is not None:
        _set_step(optimizer_state, step)
    return loaded, optimizer_state


def _copy_structure(x):
    """Nested dicts/lists copied (leaves shared): loading rewrites the request in place."""
    if isinstance(x, dict):
        return {k: _copy_structure(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_structure(v) for v in x]
    return x


def _take_sharded(wanted, loaded):
    """``wanted``'s structure and plain values, with every sharded entry replaced by what was
    loaded at the same place (the checkpoint's tensors, laid out for this run)."""
    if isinstance(wanted, ShardedBase):
        return loaded
    if isinstance(wanted, dict):
        return {k: _take_sharded(v, loaded.get(k) if isinstance(loaded, dict) else None)
                for k, v in wanted.items()}
    if isinstance(wanted, list):
        return [_take_sharded(v, loaded[i] if isinstance(loaded, list) and i < len(loaded)
                              else None) for i, v in enumerate(wanted)]
    return wanted


def _saved_step(tree) -> int | float | None:
    """The Adam step count stored in the checkpoint's optimizer state (param groups' ``step``
    or the non-distributed optimizer's ``common_step``); None if not stored as plain values."""
    steps = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "param_groups" and isinstance(v, list):
                    steps.extend(g["step"] for g in v if isinstance(g, dict) and "step" in g)
                elif k == "common_step" and not isinstance(v, ShardedBase):
                    steps.append(v)
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tree)
    values = {float(s) for s in steps if s is not None}
    if len(values) > 1:
        raise CheckpointError(f"optimizer param groups hold different Adam steps {sorted(values)}")
    return steps[0] if values else None


def _set_step(tree, step) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "param_groups" and isinstance(v, list):
                for g in v:
                    if isinstance(g, dict) and "step" in g:
                        g["step"] = step
            elif k == "common_step":
                tree[k] = step
            else:
                _set_step(v, step)
    elif isinstance(tree, list):
        for v in tree:
            _set_step(v, step)


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
