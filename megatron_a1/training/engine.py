"""The pieces of a training step, on megatron-core's real machinery.

* :func:`setup_ddp_and_optimizer` wraps model chunks in megatron-core's
  ``DistributedDataParallel`` and builds its (distributed) optimizer;
* :func:`train_step` runs ``get_forward_backward_func()`` (no pipelining, or the 1F1B /
  interleaved schedules when PP > 1) over the micro-batches and takes one optimizer step.

Losses follow megatron-core's per-token convention (``calculate_per_token_loss=True``): a loss
function returns ``(sum of token losses, number of tokens, report)``, megatron sums gradients and
``finalize_model_grads`` divides by the total number of tokens of the global batch across DP, so
the loss is a mean over masked-in tokens of the global batch, not a mean of per-sequence means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class StepResult:
    loss: float
    """Mean loss over the masked-in tokens of the global batch."""
    num_tokens: int
    """Masked-in tokens of the global batch."""
    grad_norm: float
    skipped: bool
    """True when the optimizer skipped the update (NaN/Inf gradients)."""


def setup_ddp_and_optimizer(model_chunks: list, optimizer_config: OptimizerConfig):
    """DDP-wrap the chunks (grad buffers, distributed optimizer sharding) and build the optimizer."""
    config = model_chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # handled by train_step (skip + count), not by raising
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
        for chunk in model_chunks
    ]
    optimizer = get_megatron_optimizer(optimizer_config, ddp_chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    return ddp_chunks, optimizer


def train_step(
    forward_step: Callable,
    data_iterator: Iterator,
    model: list,
    optimizer,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int = 1,
) -> StepResult:
    """One global batch: forward/backward over the micro-batches, then the optimizer step.

    ``forward_step(data_iterator, model) -> (output, loss_func)`` and ``loss_func(output) ->
    (loss_sum, num_tokens, {"loss": tensor([loss_sum, num_tokens])})`` follow megatron-core.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    totals = torch.zeros(2, dtype=torch.float64)
    for report in reports:  # only the last pipeline stage has reports
        totals += report["loss"].double().cpu()
    totals = totals.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, num_tokens = totals.tolist()
    loss = loss_sum / max(num_tokens, 1.0)

    # Every rank sees the same global loss, so all agree to skip a non-finite step. (NaN
    # gradients behind a finite loss show up as a non-finite grad norm after the step.)
    if not math.isfinite(loss):
        return StepResult(loss=loss, num_tokens=int(num_tokens), grad_norm=float("nan"),
                          skipped=True)
    update_ok, grad_norm, _ = optimizer.step()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    return StepResult(loss=loss, num_tokens=int(num_tokens), grad_norm=grad_norm,
                      skipped=not update_ok)
