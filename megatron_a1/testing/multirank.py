"""Run a function on N real ``torch.distributed`` processes (gloo on CPU) and collect results.

    results = run_multirank(body, world_size=2, args=(cfg,), timeout=300)

``body(rank, world_size, *args)`` must be a module-level (picklable) function. Every process
gets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) so the code under test initialises exactly as it would under ``torchrun``;
``body`` itself decides whether and how to call ``torch.distributed.init_process_group``
(normally through :func:`megatron_a1.runtime.initialize`). Return values must be picklable; they
come back as a list indexed by rank. If any rank raises, every rank's traceback is shown; if the
run exceeds ``timeout`` seconds all processes are killed and the error says which ranks hung.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable, Sequence

import psutil

from megatron_a1.runtime.parallel import free_port


class MultiRankError(RuntimeError):
    """One or more ranks failed or hung; the message holds each rank's traceback."""


def _worker(fn, rank, world_size, port, env, args, out_q):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle, not the queue's: torch's queue pickler shares tensors through file
        # descriptors that die with this process.
        out_q.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out_q.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _kill_with_children(p) -> None:
    """Kill a hung rank and the processes it started (megatron-core's checkpoint writer leaves a
    multiprocessing manager in every process that saved): a killed rank cannot shut them down,
    and they would outlive the test."""
    try:
        children = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it has just exited
        children = []
    p.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    p.join()


def run_multirank(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns the per-rank return values. Raises :class:`MultiRankError` with every failing
    rank's traceback (or the list of ranks still running at the timeout).
    """
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, child_env, tuple(args), out_q),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, payload = out_q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                # A rank killed by a signal (OOM, segfault) never reports: notice it here.
                for r, p in enumerate(procs):
                    if r not in results and r not in failures and p.exitcode not in (None, 0):
                        failures[r] = f"process exited with code {p.exitcode} without reporting"
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
            if not ok:
                # The other ranks are probably blocked in a collective with the dead one:
                # give them a moment to report their own errors, then stop waiting.
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:
            if p.is_alive():
                _kill_with_children(p)

    if failures or len(results) < world_size:
        hung = [r for r in range(world_size) if r not in results and r not in failures]
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())]
        if hung:
            parts.append(f"ranks {hung} did not finish within {timeout:.0f}s (killed)")
        raise MultiRankError(
            f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(parts)
        )
    return [results[r] for r in range(world_size)]
