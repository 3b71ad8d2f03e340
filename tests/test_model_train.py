"""The tiny preset trains: loss on a fixed packed batch falls over a few dozen steps (1 rank, CPU,
megatron-core's DDP + distributed optimizer + schedules, packed THD input)."""
import sys
from functools import partial

import pytest
import torch

if sys.modules.get("fla") is not None:
    pytest.skip("fla was imported before megatron-core's GDN could be guarded", allow_module_level=True)
sys.modules["fla"] = None

from megatron_a1.model.config import preset  # noqa: E402


def _loss(mask, output):
    losses = output.float().reshape(-1)
    total = (losses * mask).sum()
    n = mask.sum().to(torch.int)
    return total, n, {"loss": torch.stack([total.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_a1.model.parity import position_ids_for

    tokens, labels, mask, cu = next(data_iterator)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=int((cu[1:] - cu[:-1]).max()),
                          max_seqlen_kv=int((cu[1:] - cu[:-1]).max()))
    out = model(tokens, position_ids_for(cu)[None], None, labels=labels, packed_seq_params=psp)
    return out, partial(_loss, mask)


def test_tiny_model_loss_falls(monkeypatch):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_a1.model.build import build_model
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.training.engine import setup_ddp_and_optimizer, train_step

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # core attention's PyTorch path (the CPU demo's)
    cfg = preset("tiny_test")
    rt = initialize(seed=0)
    try:
        model = build_model(cfg, cfg.to_transformer_config(None), pg_collection=rt.pg_collection,
                            backend="local", max_seq_len=64)
        ddp, opt = setup_ddp_and_optimizer(
            [model], OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                     use_distributed_optimizer=True))
        g = torch.Generator().manual_seed(0)
        cu = torch.tensor([0, 11, 20, 32], dtype=torch.int32)
        seq = torch.randint(0, cfg.vocab_size, (1, 33), generator=g)
        batch = (seq[:, :-1], seq[:, 1:], torch.ones(32), cu)
        losses = [train_step(_forward_step, iter([batch]), ddp, opt, num_microbatches=1,
                             seq_length=32).loss for _ in range(30)]
    finally:
        destroy()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
