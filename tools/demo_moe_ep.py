"""Runtime demo: a tiny hybrid MoE model trains on CPU/gloo with expert parallelism.

    torchrun --nproc-per-node 2 tools/demo_moe_ep.py --expert-parallel 2 --steps 40

Synthetic task: sequences that repeat a random 8-token motif, so the loss visibly falls once the
model learns to copy. Every piece is megatron-core's: HybridModel (attention + MoE layers), the
alltoall token dispatcher across EP ranks, DDP with the distributed optimizer, the schedules.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from megatron_a1.model.build import build_hybrid_model
from megatron_a1.runtime import ParallelConfig, destroy, initialize
from megatron_a1.training.engine import setup_ddp_and_optimizer, train_step

VOCAB, SEQ = 64, 32


def motif_batch(g: torch.Generator, batch: int):
    motif = torch.randint(0, VOCAB, (batch, 8), generator=g)
    seq = motif.repeat(1, SEQ // 8 + 1)[:, : SEQ + 1]
    return seq[:, :-1], seq[:, 1:]


def loss_func(output):
    loss_sum = output.float().sum()
    n = torch.tensor(output.numel(), dtype=torch.int)
    return loss_sum, n, {"loss": torch.stack([loss_sum.detach(), n.float()])}


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, pos, None, labels=labels), loss_func


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert-parallel", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    rt = initialize(ParallelConfig(expert_parallel=args.expert_parallel), seed=7)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, normalization="RMSNorm", layernorm_zero_centered_gamma=True,
        qk_layernorm=True, attention_output_gate=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-3,
        expert_model_parallel_size=args.expert_parallel, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, calculate_per_token_loss=True,
    )
    model = build_hybrid_model(
        config, pattern="*E*E", vocab_size=VOCAB, max_seq_len=SEQ,
        pg_collection=rt.pg_collection, rotary_percent=0.25,
    )
    ddp, optimizer = setup_ddp_and_optimizer(
        [model], OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0,
                                 use_distributed_optimizer=True),
    )
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = args.global_batch // dp
    g = torch.Generator().manual_seed(1000 + dp_rank)
    if rt.rank == 0:
        print(f"world {rt.world_size}: EP={args.expert_parallel} DP={dp}, experts/rank "
              f"{config.num_moe_experts // args.expert_parallel}, backend {rt.backend}")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        tokens, labels = motif_batch(g, per_rank)
        micro = [(tokens[i : i + 1], labels[i : i + 1]) for i in range(per_rank)]
        res = train_step(forward_step, iter(micro), ddp, optimizer,
                         num_microbatches=per_rank, seq_length=SEQ)
        if rt.rank == 0 and (step == 1 or step % 5 == 0):
            tok_s = res.num_tokens * step / (time.time() - t0)
            print(f"step {step:3d}  loss {res.loss:.4f}  grad-norm {res.grad_norm:.3f}  "
                  f"{tok_s:,.0f} tokens/s", flush=True)
    destroy()


if __name__ == "__main__":
    main()
