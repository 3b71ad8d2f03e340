"""Foundation proof: megatron-core's real parallel machinery on CPU/gloo equals the 1-rank run.

A small ``HybridModel`` (gated attention + MoE layers, 8 experts, top-2, shared expert) takes
one optimizer step with megatron-core's distributed optimizer and pipeline schedules. The 1-rank
run saves its initial weights with ``dist_checkpointing``; every 2-rank layout (EP=2 with the
allgather and alltoall dispatchers, TP=2 with sequence parallel, PP=2 with 4 micro-batches,
DP=2) loads them, trains the same global batch and saves its updated weights. Loss, grad norm
and every updated weight equal the 1-rank run's within float32 tolerance.
"""
from __future__ import annotations

import os
from functools import partial

import pytest
import torch

from megatron_a1.testing import run_multirank

VOCAB, SEQ, GLOBAL_BATCH = 128, 16, 4


def tiny_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True,
        qk_layernorm=True,
        attention_output_gate=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_shared_expert_gate=True,
        moe_token_dispatcher_type="allgather",
        # Load balancing is computed per rank's micro-batch, so it differs from the 1-rank run
        # by design under DP; the equivalence is about the parallel machinery, so it is off.
        moe_aux_loss_coeff=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        calculate_per_token_loss=True,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    return tokens[:, :-1], tokens[:, 1:], loss_mask


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    tokens, labels, loss_mask = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def train_one_step(rank, world_size, layout, config_overrides, ckpt_in, ckpt_out):
    """One optimizer step of the tiny model under ``layout``; returns (loss, grad_norm)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_a1.model.build import build_hybrid_model
    from megatron_a1.runtime import ParallelConfig, destroy, initialize
    from megatron_a1.training.engine import setup_ddp_and_optimizer, train_step

    rt = initialize(ParallelConfig(**layout), seed=1234)
    config = tiny_config(
        sequence_parallel=rt.parallel.sequence_parallel,
        tensor_model_parallel_size=rt.parallel.tensor_parallel,
        pipeline_model_parallel_size=rt.parallel.pipeline_parallel,
        expert_model_parallel_size=rt.parallel.expert_parallel,
        pipeline_dtype=torch.float32,
        **config_overrides,
    )
    model = build_hybrid_model(
        config, pattern="*E*E", vocab_size=VOCAB, max_seq_len=SEQ,
        pg_collection=rt.pg_collection, backend="local", rotary_percent=0.25,
    )
    if os.path.exists(ckpt_in):
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_in)
        model.load_state_dict(state)
    else:  # the reference run writes the shared starting point
        os.makedirs(ckpt_in, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_in)

    ddp, optimizer = setup_ddp_and_optimizer(
        [model],
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True),
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // parallel_state.get_data_parallel_world_size()
    tokens, labels, loss_mask = global_batch()
    micro_batches = [
        (tokens[i : i + 1], labels[i : i + 1], loss_mask[i : i + 1])
        for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    ]
    result = train_step(
        _forward_step, iter(micro_batches), ddp, optimizer,
        num_microbatches=per_rank, seq_length=SEQ,
    )
    os.makedirs(ckpt_out, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_out)
    destroy()
    return result.loss, result.grad_norm


def load_plain(rank, world_size, *ckpt_dirs):
    """Full (unsharded) tensors of each checkpoint, read by dist_checkpointing on one rank."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    return [load_plain_tensors(d) for d in ckpt_dirs]


LAYOUTS = {
    "ep2_allgather": ({"expert_parallel": 2}, {}),
    "ep2_alltoall": ({"expert_parallel": 2}, {"moe_token_dispatcher_type": "alltoall"}),
    "tp2_sp": ({"tensor_parallel": 2, "sequence_parallel": True}, {}),
    "pp2": ({"pipeline_parallel": 2}, {}),
    "dp2": ({}, {}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    ckpt0, ckpt1 = str(root / "init"), str(root / "ref_step1")
    [(loss, gnorm)] = run_multirank(train_one_step, 1, args=({}, {}, ckpt0, ckpt1))
    return root, ckpt0, ckpt1, loss, gnorm


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_rank_layout_equals_single_rank(reference, name):
    root, ckpt0, ckpt_ref, ref_loss, ref_gnorm = reference
    layout, overrides = LAYOUTS[name]
    out = str(root / name)
    results = run_multirank(train_one_step, 2, args=(layout, overrides, ckpt0, out))
    for loss, gnorm in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert gnorm == pytest.approx(ref_gnorm, rel=1e-4)

    [(ref, got, init)] = run_multirank(load_plain, 1, args=(ckpt_ref, out, ckpt0))
    assert sorted(ref) == sorted(got)
    moved = 0
    for key in ref:
        # Adam moves each weight by ~lr = 1e-3; float32 reduction-order noise in the gradients
        # shows up as ~1e-6 after Adam's normalisation. A wrong layout differs by ~1e-3.
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
        moved += int(not torch.equal(ref[key], init[key]))
    assert moved > 0.8 * len(ref), "the optimizer step should have updated most tensors"


def forward_logits(rank, world_size, layout, ckpt_in, ckpt_out=None):
    """Load ``ckpt_in`` under ``layout``; return full-vocabulary logits (and save to ckpt_out)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_a1.model.build import build_hybrid_model
    from megatron_a1.runtime import ParallelConfig, destroy, initialize

    rt = initialize(ParallelConfig(**layout), seed=99)  # other seed: weights must come from disk
    config = tiny_config(
        sequence_parallel=rt.parallel.sequence_parallel,
        tensor_model_parallel_size=rt.parallel.tensor_parallel,
        expert_model_parallel_size=rt.parallel.expert_parallel,
    )
    model = build_hybrid_model(
        config, pattern="*E*E", vocab_size=VOCAB, max_seq_len=SEQ,
        pg_collection=rt.pg_collection, backend="local", rotary_percent=0.25,
    )
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_in))
    if ckpt_out:
        os.makedirs(ckpt_out, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_out)
    tokens, _, _ = global_batch(seed=5)
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)
    logits = gather_from_tensor_model_parallel_region(logits, parallel_state.get_tensor_model_parallel_group())
    destroy()
    return logits


def test_checkpoint_saved_under_ep2_loads_under_tp2(reference):
    """dist_checkpointing reshards: saved with EP=2, loaded with EP=1/TP=2 (+SP) and on 1 rank."""
    root, ckpt0, _, _, _ = reference
    ep2_ckpt = str(root / "saved_under_ep2")
    ep2 = run_multirank(forward_logits, 2, args=({"expert_parallel": 2}, ckpt0, ep2_ckpt))
    tp2 = run_multirank(
        forward_logits, 2, args=({"tensor_parallel": 2, "sequence_parallel": True}, ep2_ckpt)
    )
    [single] = run_multirank(forward_logits, 1, args=({}, ep2_ckpt))
    assert single.shape == (GLOBAL_BATCH, SEQ, VOCAB)
    for logits in ep2 + tp2:
        torch.testing.assert_close(logits, single, rtol=1e-5, atol=1e-5)
