"""Throughput, FLOPs and memory for the training logs.

FLOP count of one training step on a packed batch (forward + backward = 3 x forward):

* matmuls: ``2 * P_active`` FLOPs per token in the forward, where ``P_active`` counts every
  weight a token multiplies by: dense weights, the shared expert, ``top_k`` of the routed experts
  (``expert params * top_k / num_experts``) and the output layer; the input embedding is a gather
  and does not count;
* causal attention scores per document of length ``L`` and per full-attention layer:
  ``2 * 2 * L^2 / 2 * heads * head_dim`` (QK^T and PV, half of the square);
* Gated DeltaNet (chunked delta rule, chunk ``C``) per token and GDN layer: about
  ``4 * C * (d_k + d_v) * v_heads`` for the intra-chunk products plus ``4 * d_k * d_v * v_heads``
  for the state update and readout.

TFLOP/s per GPU = step FLOPs / step time / number of GPUs (model-parallel ranks included).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class FlopModel:
    active_matmul_params: int
    attention_layers: int
    attention_width: int  # heads * head_dim (query side)
    gdn_layers: int = 0
    gdn_flops_per_token: int = 0

    def step_flops(self, doc_lengths: list[int]) -> float:
        tokens = sum(doc_lengths)
        fwd = 2.0 * self.active_matmul_params * tokens
        fwd += self.attention_layers * 2.0 * self.attention_width * sum(l * l for l in doc_lengths)
        fwd += self.gdn_layers * self.gdn_flops_per_token * tokens
        return 3.0 * fwd


def step_counts(micro_batches: list[dict], flops: FlopModel, group=None) -> tuple[int, float]:
    """Real (unpadded) tokens and model FLOPs of one step's micro-batches, summed over the ranks
    of ``group`` (the data-parallel replicas; None: this rank alone). Rollout packs are uneven
    across replicas — one may hold none — so the step's figure is a sum, not this rank's
    times the replica count."""
    import torch.distributed as dist

    tokens = sum(int(b["cu_seqlens"][-1]) - int(b.get("num_padding", 0)) for b in micro_batches)
    docs = []  # the real documents: a pack's padding is one extra segment at its end
    for b in micro_batches:
        lengths = [int(x) for x in torch.diff(b["cu_seqlens"])]
        docs += lengths[:-1] if int(b.get("num_padding", 0)) else lengths
    totals = torch.tensor([tokens, flops.step_flops(docs)], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl":
            totals = totals.cuda()
        dist.all_reduce(totals, group=group)
    return int(totals[0]), float(totals[1])


def flop_model(model_chunks: list, config, *, pattern: str, num_experts: int | None,
               top_k: int | None) -> FlopModel:
    """Active matmul parameters counted from the built model (global, across TP/EP/PP ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dense = expert = 0
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if "embedding" in name or p.dim() < 2:
                continue  # embeddings are gathers; norms/biases are not matmuls
            n = p.numel()
            if ".experts." in name and "shared" not in name:
                expert += n
            else:
                # tensor-parallel weights are split over TP ranks; replicated ones are not
                dense += n if getattr(p, "tensor_model_parallel", False) else n / max(
                    parallel_state.get_tensor_model_parallel_world_size(), 1)
    counts = torch.tensor([dense, expert], dtype=torch.float64)
    if dist.is_initialized():
        # dense: summed over TP and PP ranks; experts: over EP (x expert-TP) and PP ranks
        dense_t = counts[:1].clone()
        dist.all_reduce(dense_t, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(dense_t, group=parallel_state.get_pipeline_model_parallel_group())
        expert_t = counts[1:].clone()
        dist.all_reduce(expert_t, group=parallel_state.get_expert_tensor_and_model_parallel_group())
        dist.all_reduce(expert_t, group=parallel_state.get_pipeline_model_parallel_group())
        counts = torch.cat([dense_t, expert_t])
    dense, expert = counts.tolist()
    if num_experts and top_k:
        expert = expert * top_k / num_experts
    attn_layers, gdn_layers = pattern.count("*"), pattern.count("G")
    gdn_per_token = 0
    if gdn_layers and getattr(config, "linear_num_value_heads", None):
        dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
        gdn_per_token = 4 * 64 * (dk + dv) * config.linear_num_value_heads + \
            4 * dk * dv * config.linear_num_value_heads
    return FlopModel(
        active_matmul_params=int(dense + expert),
        attention_layers=attn_layers,
        attention_width=config.num_attention_heads * config.kv_channels,
        gdn_layers=gdn_layers,
        gdn_flops_per_token=gdn_per_token,
    )


def memory_gib() -> tuple[float, str]:
    """(peak memory in GiB, what it measures): CUDA allocator peak, or process RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda peak"
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30, "rss"


class MoELoadTracker:
    """Expert load balance: tokens routed to each expert, per MoE layer, over a logging window.

    A forward hook on every megatron-core ``TopKRouter`` adds up its routing map ([tokens,
    experts] bool). ``imbalance()`` is the mean over layers of ``max_e load / mean_e load``
    (1.0 = perfectly balanced; ``num_experts`` = every token to one expert), loads summed over
    the data-parallel group (it spans the expert-parallel ranks, so every token of this pipeline
    stage's layers counts once). With pipeline parallelism the logging rank reports its own
    (the last) stage's layers.
    """

    def __init__(self, model_chunks: list):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        if not module.training:
            return  # teachers/reference/rollout forwards are not the step's routing
        routing_map = output[1].detach()
        # stays on the device: a host copy here would synchronise every MoE layer's forward
        load = routing_map.reshape(-1, routing_map.shape[-1]).sum(0, dtype=torch.float64)
        key = id(module)
        self.counts[key] = self.counts.get(key, 0) + load

    def imbalance(self) -> float | None:
        """The window's imbalance (collective over the data-parallel group)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        if not self.handles:
            return None
        group = parallel_state.get_data_parallel_group()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")  # NCCL reduces device tensors only
        # every rank has the same layers; stacked in forward order for one all-reduce
        loads = torch.stack(list(self.counts.values())) if self.counts else None
        size = torch.tensor([0 if loads is None else loads.shape[1]], device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
        if loads is None or loads.shape[0] != len(self.handles):
            loads = torch.zeros(len(self.handles), int(size), dtype=torch.float64, device=device)
        dist.all_reduce(loads, group=group)
        self.counts.clear()
        mean = loads.mean(1)
        ok = mean > 0
        if not ok.any():
            return None
        return float((loads.max(1).values[ok] / mean[ok]).mean())
