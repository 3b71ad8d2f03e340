"""CPU backend for megatron-core: run its real code on machines without CUDA.

megatron-core 0.19.2 is written for GPUs and calls CUDA-only APIs in places that have nothing to
do with the maths. :func:`install` covers exactly those calls, is applied by
:func:`megatron_a1.runtime.initialize` only when ``torch.cuda.is_available()`` is false, and is a
no-op otherwise. None of it changes numerics: every patched call either moves a tensor that
megatron-core *places* on ``"cuda"`` to the CPU, or maps a CUDA RNG/stream/sync call onto its
CPU meaning. Each entry names the megatron-core call it covers.

1. **Hard-coded CUDA placement** (a torch function mode, below): ``device="cuda"`` / an integer
   device / ``Tensor.cuda()`` become the CPU and ``pin_memory`` is dropped. Covers e.g.
   ``transformer.utils.get_default_causal_mask`` (``torch.ones(sq, sq, device="cuda")``),
   ``optimizer.MixedPrecisionOptimizer.__init__`` (``torch.tensor([0], device='cuda')``),
   ``RotaryEmbedding.get_emb`` (``.to(device=torch.cuda.current_device())``) and the DDP grad
   buffers (``device=torch.cuda.current_device()``).
2. **CUDA RNG** → the CPU generator: ``tensor_parallel.random`` (the model-parallel RNG tracker
   used for weight init and dropout) saves, seeds and restores the CUDA generator; CPU tensors
   draw from the CPU generator, so that is the one the tracker must fork.
3. **Device queries and syncs**: ``torch.cuda.current_device`` (the CPU device: e.g.
   ``tensor_parallel.mappings._gather_along_first_dim`` allocates with it in backward passes),
   ``torch.cuda.synchronize`` (no-op; CPU ops are synchronous), used by
   ``dist_checkpointing.strategies.filesystem_async.preload_tensors`` among others.
4. **dtype checks by type string**: ``optimizer.DistributedOptimizer`` and
   ``Float16OptimizerWithFloat16Params`` accept parameters only if ``param.type()`` is
   ``'torch.cuda.FloatTensor'`` (or Half/BFloat16); ``Tensor.type()`` without arguments reports
   the CUDA name of the same dtype.
5. **Streams and events**: ``distributed.param_and_grad_buffer`` (``start_grad_sync`` waits on
   ``torch.cuda.current_stream()``), the pipeline schedules and the MoE dispatchers create side
   streams and events to overlap communication. CPU ops and gloo collectives are synchronous, so
   a stream is a no-op object and an event is always complete.
6. **alltoall split sizes**: ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` turns
   the split-size tensors into NumPy arrays through ``moe_utils.maybe_move_tensor_to_cpu``, but
   only for CUDA tensors; on CPU they stay tensors, which ``all_to_all_single`` rejects. The
   replacement also converts CPU tensors when NumPy is asked for.
7. **Compiled fusions run eagerly**: ``megatron.core.jit.jit_fuser`` is ``torch.compile``
   (e.g. the Gated DeltaNet's ``_compute_g_and_beta`` and gated norm); on CPU inductor spends
   ~20 s generating C++ per new shape for no gain on tiny models, so TorchDynamo is disabled in
   CPU processes. Eager execution is the reference the compiled kernels are checked against.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An integer device index always names an accelerator, never the CPU.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaPlacementToCpu(TorchFunctionMode):
    """Redirect tensors that megatron-core places on CUDA to the CPU (item 1 above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # item 4: megatron-core checks dtypes by CUDA type string
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stands in for ``torch.cuda.Event`` (recorded work is always complete on CPU)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _DropTrackerCpuRngWarning(logging.Filter):
    # CudaRNGStatesTracker.fork warns when the CPU generator changed inside a fork. On CPU the
    # fork *is* a swap of the CPU generator (item 2), so the warning is expected noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def install() -> None:
    """Apply the CPU backend (idempotent). Does nothing when CUDA is available."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    # 1. placement
    mode = _CudaPlacementToCpu()
    mode.__enter__()  # process-wide: stays active for the life of this (CPU-only) process

    # 2. RNG: the CUDA generator's role is played by the CPU generator.
    get_state = lambda *a, **k: torch.get_rng_state()  # noqa: E731
    set_state = lambda state, *a, **k: torch.set_rng_state(state)  # noqa: E731
    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    # (not torch.manual_seed itself: it calls torch.cuda.manual_seed_all)
    torch.cuda.manual_seed = torch.cuda.manual_seed_all = torch.default_generator.manual_seed
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropTrackerCpuRngWarning())

    # 3. device queries and syncs
    # A device object, not an index: autograd backward runs outside the function mode (a mode
    # is suspended while a torch function such as torch.autograd.backward executes), and
    # megatron-core's backward passes allocate with device=torch.cuda.current_device().
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None

    # 5. streams and events
    default_stream = _CpuStream()
    torch.cuda.Stream, torch.cuda.Event = _CpuStream, _CpuEvent
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: default_stream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: False

    # 6. alltoall split sizes
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    upstream_move = moe_utils.maybe_move_tensor_to_cpu

    def move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return upstream_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = move_to_host

    # 7. compiled fusions run eagerly
    import torch._dynamo as dynamo

    dynamo.config.disable = True
    _installed = True
