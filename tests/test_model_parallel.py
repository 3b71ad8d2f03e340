"""The full model (Gated DeltaNet + gated attention + MoE) under 2-rank layouts equals 1 rank.

A random transformers checkpoint is converted once; every layout (EP=2 with the alltoall
dispatcher, TP=2 with sequence parallelism, PP=2) loads the same converted checkpoint, computes
logits (gathered over TP; from the last pipeline stage) and takes one SGD step (lr 1, no
clipping, no weight decay: updated = initial - grad; megatron's distributed optimizer takes
only Adam) through megatron-core's DDP and pipeline schedules. Logits, loss and every gradient
equal the 1-rank run's.

Core attention runs its PyTorch path here (``TRITON_INTERPRET=0`` in the ranks): the Triton
kernels under the interpreter are covered by ``test_model_parity.py`` and cost minutes here.

The load-balancing aux loss is off: it is computed per rank's micro-batch (by design different
under data parallelism), which is not what this test is about.
"""
from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import torch

if sys.modules.get("fla") is not None:
    pytest.skip("fla was imported before transformers could be guarded", allow_module_level=True)
sys.modules["fla"] = None
sys.modules.setdefault("causal_conv1d", None)

from megatron_a1.model.config import preset  # noqa: E402
from megatron_a1.testing import run_multirank  # noqa: E402

CFG = preset("tiny_test")
SEQ, GLOBAL_BATCH = 8, 2


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


_LOGITS: list = []


def _loss(output):
    losses = output.float().reshape(-1)
    n = torch.tensor(losses.numel(), dtype=torch.int)
    return losses.sum(), n, {"loss": torch.stack([losses.sum().detach(), n.float()])}


def _collect_logits(output):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    _LOGITS.append(gather_from_tensor_model_parallel_region(
        output, parallel_state.get_tensor_model_parallel_group()).detach().clone())
    zero = output.sum() * 0
    return zero, torch.tensor(1, dtype=torch.int), {"loss": torch.zeros(2)}


def _forward_step(data_iterator, model, with_labels=True):
    tokens, labels = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    if with_labels:
        return model(tokens, pos, None, labels=labels), _loss
    return model(tokens, pos, None), _collect_logits


def run_layout(rank, world_size, layout, ckpt, out_dir, ref_dir=None):
    """Logits, one SGD step; saves the updated weights, or (``ref_dir``) compares this rank's
    gradient shards with the reference's, loaded under the same layout."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_a1.model import parity
    from megatron_a1.runtime import ParallelConfig, destroy, initialize
    from megatron_a1.training.engine import setup_ddp_and_optimizer, train_step

    rt = initialize(ParallelConfig(**layout), seed=123)
    model = parity.build_from_checkpoint(CFG, ckpt, rt.pg_collection, rt.parallel,
                                         moe_aux_loss_coeff=0.0)
    ddp, optimizer = setup_ddp_and_optimizer(
        [model], OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0,
                                 clip_grad=0.0, use_distributed_optimizer=False))
    dp, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    tokens, labels = _batch()
    per_rank = GLOBAL_BATCH // dp_size
    mine = [(tokens[i:i + 1], labels[i:i + 1]) for i in range(dp * per_rank, (dp + 1) * per_rank)]

    _LOGITS.clear()
    for m in ddp:
        m.eval()
    get_forward_backward_func()(
        forward_step_func=partial(_forward_step, with_labels=False), data_iterator=iter(mine),
        model=ddp, num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1,
        forward_only=True)
    logits = torch.cat(_LOGITS) if _LOGITS else None
    for m in ddp:
        m.train()
    result = train_step(_forward_step, iter(mine), ddp, optimizer,
                        num_microbatches=per_rank, seq_length=SEQ)
    mismatches, moved = [], 0
    if ref_dir is None:
        os.makedirs(out_dir, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    else:  # SGD with lr 1: initial - updated is the gradient
        init = parity.build_from_checkpoint(CFG, ckpt, rt.pg_collection, rt.parallel)
        ref = parity.build_from_checkpoint(CFG, ref_dir, rt.pg_collection, rt.parallel)
        refs, inits = dict(ref.named_parameters()), dict(init.named_parameters())
        for name, p in model.named_parameters():
            g, g_ref = inits[name] - p.detach(), inits[name] - refs[name]
            moved += int(bool(g_ref.abs().max() > 0))
            if not torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6):
                mismatches.append(f"{name}: max |diff| {(g - g_ref).abs().max():.3g}")
    destroy()
    return logits, result.loss, result.grad_norm, dp, per_rank, mismatches, moved


def convert_then_run(rank, world_size, root):
    """The reference: convert a random HF checkpoint, then run the 1-rank layout on it."""
    from megatron_a1.model import convert, parity

    parity.random_hf_model(CFG, seed=11).save_pretrained(os.path.join(root, "hf"))
    ckpt = os.path.join(root, "init")
    convert.hf_to_megatron(os.path.join(root, "hf"), ckpt, log=lambda *_: None)
    return run_layout(rank, world_size, {}, ckpt, os.path.join(root, "ref"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("model_parallel"))
    [ref] = run_multirank(convert_then_run, 1, args=(root,), env=ENV)
    return root, os.path.join(root, "init"), ref


ENV = {"TRITON_INTERPRET": "0"}
LAYOUTS = {
    "ep2_alltoall": {"expert_parallel": 2},
    "tp2_sp": {"tensor_parallel": 2, "sequence_parallel": True},
    "pp2": {"pipeline_parallel": 2},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_ranks_equal_one_rank(reference, name):
    root, ckpt, (ref_logits, ref_loss, ref_gnorm, *_) = reference
    results = run_multirank(run_layout, 2, args=(LAYOUTS[name], ckpt, None,
                                                 os.path.join(root, "ref")), env=ENV)
    got = {}
    for logits, loss, gnorm, dp, per_rank, mismatches, moved in results:
        assert not mismatches, "gradients differ from 1 rank:\n" + "\n".join(mismatches)
        assert moved > 10, "the step should have updated the parameters"
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert gnorm == pytest.approx(ref_gnorm, rel=1e-4)
        if logits is not None:  # last pipeline stage: this DP rank's part of the batch
            got[dp] = logits
            torch.testing.assert_close(
                logits, ref_logits[dp * per_rank:(dp + 1) * per_rank], rtol=1e-5, atol=1e-5)
    assert got, "no rank returned logits"
