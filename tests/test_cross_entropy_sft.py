"""The SFT stage's fused loss (``sft.fused_loss=true``, the default) gives the same loss and the
same gradient of every parameter as megatron-core's output layer + vocab-parallel cross-entropy
(``sft.fused_loss=false``): one forward/backward of the ``tiny_test`` hybrid MoE on a ragged
THD pack, on one rank and on TP=2 with sequence parallelism (gloo).
"""
import numpy as np
import pytest

from megatron_a1.testing import run_multirank


def _body(rank, world, overrides):
    from megatron_a1.configs import load_config
    from megatron_a1.data.dataset import build_sample, collate_thd
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.model_setup import build_model_chunks
    from megatron_a1.training.stages import make_stage

    cfg = load_config(TrainConfig, None, overrides)
    rt = initialize(cfg.parallel, seed=cfg.train.seed)
    [model], info = build_model_chunks(cfg, rt)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 128, size=n) for n in (23, 40, 17)]
    masks = [(rng.random(len(d)) > 0.3).astype(np.float32) for d in docs]
    sample = build_sample(docs, masks)
    sample.update(domains=[""] * len(docs), doc_ids=list(range(len(docs))), dataset_id=0)
    batch = collate_thd([sample], pad_to_multiple=cfg.parallel.tensor_parallel)

    out = {}
    for fused in (False, True):
        cfg.sft.fused_loss = fused
        stage = make_stage(cfg, rt, info, [model])
        model.zero_grad(set_to_none=True)
        output, loss_func = stage.forward_step(iter([dict(batch)]), model)
        loss_sum, num_tokens, _ = loss_func(output)
        loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[fused] = (loss_sum.item(), int(num_tokens), grads)
    destroy()
    (l0, n0, g0), (l1, n1, g1) = out[False], out[True]
    worst = {k: ((g1[k] - g0[k]).abs().max() / g0[k].abs().max().clamp(min=1e-30)).item()
             for k in g0}
    return {"loss": (l0, l1), "tokens": (n0, n1), "same_params": sorted(g0) == sorted(g1),
            "worst_rel": worst, "head_grad": g1["output_layer.weight"].abs().max().item()}


# one rank without the interpreter: the chunked PyTorch path of a CPU run (the demo); TP=2 + SP
# under TRITON_INTERPRET=1: the Triton kernels
@pytest.mark.parametrize("layout,interpret", [
    ([], "0"), (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], "1")],
    ids=["one_rank_pytorch_path", "tp2_sp_triton"])
def test_fused_sft_loss_equals_megatron_path(layout, interpret):
    overrides = ["model.preset=tiny_test", "model.backend=local", "sft.chunk_size=16"] + layout
    for r in run_multirank(_body, 2 if layout else 1, args=(overrides,), timeout=600,
                           env={"TRITON_INTERPRET": interpret}):
        l0, l1 = r["loss"]
        assert r["tokens"][0] == r["tokens"][1] > 40
        assert abs(l1 - l0) <= 1e-5 * abs(l0), r["loss"]
        assert r["same_params"] and r["head_grad"] > 0
        bad = {k: v for k, v in r["worst_rel"].items() if not v <= 3e-5}
        assert not bad, bad
