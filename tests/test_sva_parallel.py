"""Vocab-parallel SVA (2 and 4 gloo ranks) equals unsharded; the objective under data parallelism."""
import pytest
import torch

from megatron_a1.testing.multirank import run_multirank


def _tp_body(rank, world, k):
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from a1_kernels.sva import fused_linear_sva, sva_loss

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    n, v_local, real = 9, 40, 40 * world - 13  # the last shard is partly padding
    s = torch.randn(n, v_local * world, generator=g)
    t = (torch.randn(n, v_local * world, generator=g) * 2).round() / 2  # ties across shards
    t[:, real:] = 50.0
    t[0, :] = 1.0  # one row all tied: lowest global ids win
    mask = torch.ones(n, dtype=torch.bool)
    mask[4] = False
    grad_out = torch.linspace(0.5, 2.0, n)
    shard = slice(rank * v_local, (rank + 1) * v_local)

    def run(student, teacher, **kw):
        x = student.clone().requires_grad_(True)
        loss = sva_loss(x, teacher, k, vocab_size=real, mask=mask, **kw)
        loss.backward(grad_out)
        return loss.detach(), x.grad

    full_loss, full_grad = run(s, t)
    loss, grad = run(s[:, shard].contiguous(), t[:, shard].contiguous(), tp_group=group)
    out = {"loss": (loss - full_loss).abs().max().item(),
           "grad": (grad - full_grad[:, shard]).abs().max().item()}

    h, h_t = 12, 10
    hs, ht = torch.randn(n, h, generator=g), torch.randn(n, h_t, generator=g)
    ws, wt = torch.randn(v_local * world, h, generator=g), torch.randn(v_local * world, h_t, generator=g)

    def run_fused(w_s, w_t, **kw):
        a, b = hs.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        loss = fused_linear_sva(a, b, ht, w_t, k, chunk_size=4, mask=mask, vocab_size=real, **kw)
        loss.backward(grad_out)
        return loss.detach(), a.grad, b.grad

    f_loss, f_gh, f_gw = run_fused(ws, wt)
    p_loss, p_gh, p_gw = run_fused(ws[shard].contiguous(), wt[shard].contiguous(), tp_group=group)
    out["fused_loss"] = (p_loss - f_loss).abs().max().item()
    out["fused_gh"] = (p_gh - f_gh).abs().max().item()
    out["fused_gw"] = (p_gw - f_gw[shard]).abs().max().item()
    out["nonzero"] = bool(full_loss.abs().sum() > 0 and f_gh.abs().sum() > 0)
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_vocab_parallel_equals_unsharded(world):
    results = run_multirank(_tp_body, world, args=(8,), timeout=600)
    for r in results:
        assert r["nonzero"]
        assert r["loss"] < 1e-5 and r["grad"] < 1e-6, r
        assert r["fused_loss"] < 1e-5 and r["fused_gh"] < 1e-5 and r["fused_gw"] < 1e-5, r


def _dp_body(rank, world):
    import torch.distributed as dist

    from a1_kernels.sva import domain_normalized_loss
    from a1_kernels.sva.reference import domain_normalized_reference

    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(1)
    # Global batch of 6 samples / 30 tokens split over 2 ranks; domain 2 only on rank 1,
    # domain 0 only on rank 0, domain 1 on both, domain 3 nowhere.
    loss = torch.rand(30, generator=g)
    mask = torch.rand(30, generator=g) > 0.25
    idx = torch.arange(30) // 5
    dom = torch.tensor([0, 1, 0, 1, 2, 2])
    ref_in = loss.clone().requires_grad_(True)
    ref = domain_normalized_reference(ref_in, mask, idx, dom)
    ref.backward()
    mine = slice(rank * 15, (rank + 1) * 15)
    local = loss[mine].clone().requires_grad_(True)
    out = domain_normalized_loss(local, mask[mine], idx[mine] - 3 * rank, dom[3 * rank:3 * rank + 3],
                                 num_domains=4, dp_group=dist.group.WORLD)
    out.loss.backward()
    grad = local.grad / world  # what the averaging DP reduction would contribute from this rank
    summed = [torch.zeros(15) for _ in range(world)]
    dist.all_gather(summed, grad)
    shares = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(shares, out.loss.detach() / world)
    return {"value": abs(out.value.item() - ref.item()),
            "share_sum": abs(sum(x.item() for x in shares) - ref.item()),
            "grad": (torch.cat(summed) - ref_in.grad).abs().max().item()}


def test_objective_under_data_parallel():
    for r in run_multirank(_dp_body, 2, timeout=300):
        assert r["value"] < 1e-6 and r["share_sum"] < 1e-6 and r["grad"] < 1e-7, r
