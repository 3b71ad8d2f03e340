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
import math
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

    def smallest_world_size(self) -> int:
        """The fewest ranks this layout can be built on: both the dense part (TP x PP x CP) and
        the experts (expert-TP x EP x PP) need whole replicas (1 if a size is invalid)."""
        try:
            self.validate_sizes()
        except ParallelLayoutError:
            return 1
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        etp = self.expert_tensor_parallel or tp
        return math.lcm(tp * pp * self.context_parallel, etp * self.expert_parallel * pp)

    def validate_sizes(self) -> None:
        """Raise :class:`ParallelLayoutError` unless every size is a positive integer."""
        sizes = {
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "context_parallel": self.context_parallel,
            "expert_parallel": self.expert_parallel,
            "virtual_pipeline_parallel": self.virtual_pipeline_parallel or 1,
            "expert_tensor_parallel": self.expert_tensor_parallel or 1,
        }
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ParallelLayoutError(f"parallel.{name}: must be a positive integer, got "
                                          f"{getattr(self, name)!r}")

    def validate(self, world_size: int) -> None:
        """Raise :class:`ParallelLayoutError` if megatron-core cannot build this layout on
        ``world_size`` ranks (``initialize_model_parallel``'s rules); the message names the
        ``parallel.*`` key as the YAML spells it and a fix."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ParallelLayoutError(f"world size {world_size!r}: must be a positive integer")
        self.validate_sizes()
        tp, pp, cp, ep = (self.tensor_parallel, self.pipeline_parallel, self.context_parallel,
                          self.expert_parallel)
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ParallelLayoutError(
                f"parallel.tensor_parallel/pipeline_parallel/context_parallel: world size "
                f"{world_size} is not divisible by tensor_parallel ({tp}) x pipeline_parallel "
                f"({pp}) x context_parallel ({cp}) = {model_parallel}; choose sizes whose "
                f"product divides {world_size}, or run on a multiple of {model_parallel} ranks"
            )
        etp = self.expert_tensor_parallel or tp
        expert_model_parallel = etp * ep * pp
        if world_size % expert_model_parallel:
            said = (f"expert_tensor_parallel ({etp})" if self.expert_tensor_parallel is not None
                    else f"expert_tensor_parallel (null -> defaults to tensor_parallel={tp})")
            fixes = []
            if world_size % (etp * pp) == 0:
                fits = [e for e in range(1, ep) if world_size // (etp * pp) % e == 0]
                fixes.append(f"parallel.expert_parallel={fits[-1]} (any divisor of "
                             f"{world_size // (etp * pp)})")
            if etp > 1 and world_size % (ep * pp) == 0:
                fixes.append("parallel.expert_tensor_parallel=1")
            fixes.append(f"a multiple of {expert_model_parallel} ranks")
            raise ParallelLayoutError(
                f"parallel.expert_parallel: world size {world_size} is not divisible by {said} "
                f"x expert_parallel ({ep}) x pipeline_parallel ({pp}) = {expert_model_parallel}, "
                f"the ranks one replica of the expert layers needs; use " + " or ".join(fixes)
            )
        if self.sequence_parallel and tp == 1:
            raise ParallelLayoutError("parallel.sequence_parallel: needs tensor_parallel > 1 "
                                      "(set parallel.sequence_parallel=false or raise "
                                      "parallel.tensor_parallel)")
        if self.virtual_pipeline_parallel is not None and pp == 1:
            raise ParallelLayoutError("parallel.virtual_pipeline_parallel: needs "
                                      "pipeline_parallel > 1 (set it to null)")


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
