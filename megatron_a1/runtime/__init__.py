"""Distributed runtime: initialise/tear down torch.distributed + megatron-core parallel state."""
from megatron_a1.runtime.parallel import (
    ParallelConfig,
    ParallelLayoutError,
    Runtime,
    destroy,
    initialize,
    seed_everything,
)

__all__ = ["ParallelConfig", "ParallelLayoutError", "Runtime", "destroy", "initialize",
           "seed_everything"]
