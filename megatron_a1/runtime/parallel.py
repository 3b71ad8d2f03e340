"""Distributed runtime: one ``initialize`` for torchrun (NCCL on GPU, gloo on CPU) and one teardown.

    from megatron_a1.runtime import ParallelConfig, initialize, destroy
    rt = initialize(ParallelConfig(tensor_parallel=2, expert_parallel=2), seed=1234)
    model = build_model(..., pg_collection=rt.pg_collection)
    ...
    destroy()

``initialize`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; a single process without them is world size 1), validates the
parallel layout *before* any process group exists, picks NCCL when CUDA is present and gloo
otherwise, installs the CPU compatibility layer when there is no CUDA device, creates
megatron-core's process groups and seeds every RNG (Python, NumPy, torch, and megatron-core's
tensor-parallel RNG tracker) reproducibly.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class ParallelLayoutError(ValueError):
    """The requested parallel layout cannot be built on this world size."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout. The data-parallel size is derived: world / (TP * PP * CP)."""

    tensor_parallel: int = 1
    """Tensor-parallel size (attention heads, MLP columns, vocabulary)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (layer stages)."""
    virtual_pipeline_parallel: int | None = None
    """Interleaved pipeline chunks per rank (None: no interleaving)."""
    context_parallel: int = 1
    """Context-parallel size (sequence split across ranks for attention)."""
    expert_parallel: int = 1
    """Expert-parallel size (MoE experts split across ranks)."""
    expert_tensor_parallel: int | None = None
    """Tensor-parallel size inside each expert (None: same as ``tensor_parallel``)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_parallel > 1; required by MoE with TP)."""
    distributed_timeout_minutes: int = 30
    """Timeout of collective operations."""

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    def validate(self, world_size: int) -> None:
        """Raise :class:`ParallelLayoutError` naming the problem if the layout is impossible."""
        sizes = {
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "context_parallel": self.context_parallel,
            "expert_parallel": self.expert_parallel,
        }
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {size!r}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model_parallel:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by tensor_parallel "
                f"({self.tensor_parallel}) x pipeline_parallel ({self.pipeline_parallel}) x "
                f"context_parallel ({self.context_parallel}) = {model_parallel}"
            )
        etp = self.expert_tensor_parallel or self.tensor_parallel
        expert_model_parallel = etp * self.expert_parallel * self.pipeline_parallel
        if world_size % expert_model_parallel:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by expert_tensor_parallel ({etp}) x "
                f"expert_parallel ({self.expert_parallel}) x pipeline_parallel "
                f"({self.pipeline_parallel}) = {expert_model_parallel}"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ParallelLayoutError("sequence_parallel needs tensor_parallel > 1")
        if self.virtual_pipeline_parallel is not None and self.pipeline_parallel == 1:
            raise ParallelLayoutError("virtual_pipeline_parallel needs pipeline_parallel > 1")


@dataclass
class Runtime:
    """What ``initialize`` set up: ranks, device and megatron-core's process groups."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    parallel: ParallelConfig
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def data_parallel(self) -> int:
        return self.parallel.data_parallel(self.world_size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def seed_everything(seed: int, *, pp_rank: int = 0) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker.

    Pipeline stages get different seeds (their layers differ); tensor-parallel ranks share the
    default seed and megatron-core's tracker gives them distinct streams for sharded weights.
    """
    from megatron.core import tensor_parallel

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(parallel: ParallelConfig | None = None, *, seed: int = 1234) -> Runtime:
    """Initialise torch.distributed and megatron-core's parallel state from the environment."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel = parallel or ParallelConfig()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    parallel.validate(world_size)  # before any process group exists

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        from megatron_a1.runtime import cpu_compat

        cpu_compat.install()
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        # A plain single process (no launcher): a private store on a free port, given directly
        # rather than through MASTER_ADDR/MASTER_PORT, which every process it starts later
        # (a server, a converter) would inherit and try to bind again.
        plain = "MASTER_ADDR" not in os.environ and world_size == 1
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{free_port()}" if plain else None,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
            device_id=device if use_cuda else None,
        )

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_everything(seed, pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return Runtime(rank, world_size, local_rank, device, backend, parallel, pgs)


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on localhost now, for ``MASTER_PORT``, drawn *below* the kernel's
    ephemeral range: a port the kernel hands out for ``bind(0)`` or an outgoing connection (an
    HTTP client, another test's gloo sockets) can be taken by someone else between this probe
    and the rendezvous binding it; one outside that range can only collide with another
    explicit choice, and random draws make that unlikely."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default start of the ephemeral range
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
