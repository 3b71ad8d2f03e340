"""fused_linear_sva equals the unfused path and the reference; the domain-normalised objective."""
import pytest
import torch

from a1_kernels.sva import domain_normalized_loss, fused_linear_sva, sva_loss
from a1_kernels.sva.reference import (domain_normalized_reference, fused_linear_sva_reference,
                                      sva_loss_reference)


def _heads(t=19, h=24, h_t=20, v=150, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    return mk(t, h), mk(v, h), mk(t, h_t), mk(v, h_t)


def _grads(fn, hs, ws, ht, wt, grad_out, **kw):
    hs, ws = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = fn(hs, ws, ht, wt, **kw)
    loss.backward(grad_out)
    return loss.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("k,chunk", [(1, 4), (8, 5), (64, 19), (8, 64)])
def test_fused_equals_unfused_and_reference(k, chunk):
    hs, ws, ht, wt = _heads(seed=k)
    mask = torch.ones(19, dtype=torch.bool)
    mask[[0, 7, 8, 18]] = False
    grad_out = torch.linspace(0.5, 1.5, 19)
    fused = _grads(lambda *a, **kw: fused_linear_sva(*a, topk=k, chunk_size=chunk, **kw),
                   hs, ws, ht, wt, grad_out, mask=mask, vocab_size=141)
    unfused = _grads(lambda a, b, c, d, **kw: sva_loss(a @ b.t(), c @ d.t(), k, **kw),
                     hs, ws, ht, wt, grad_out, mask=mask, vocab_size=141)
    ref = _grads(lambda *a, **kw: fused_linear_sva_reference(*a, k, **kw),
                 hs, ws, ht, wt, grad_out, mask=mask, vocab_size=141)
    for a, b, c in zip(fused, unfused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    assert not fused[0][~mask].any() and not fused[1][~mask].any()
    assert not fused[2][141:].any()  # padded vocabulary rows never salient


def test_fused_bf16():
    hs, ws, ht, wt = _heads(seed=3, dtype=torch.bfloat16)
    loss, gh, gw = _grads(lambda *a: fused_linear_sva(*a, topk=8, chunk_size=6), hs, ws, ht, wt,
                          torch.ones(19))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # Oracle at the same dtype: the reference on the bf16 logits of the same bf16 heads (an fp32
    # oracle would pick a different salient set wherever bf16 rounding reorders the teacher).
    ref = _grads(lambda a, b, c, d: sva_loss_reference(a @ b.t(), c @ d.t(), 8), hs, ws, ht, wt,
                 torch.ones(19))
    # Student logits on S are k dot products here vs one matmul there: 1 bf16 ulp apart at most.
    torch.testing.assert_close(loss, ref[0], atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(gh.float(), ref[1].float(), atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), ref[2].float(), atol=1e-2, rtol=2e-2)


def test_fused_validation():
    hs, ws, ht, wt = _heads()
    with pytest.raises(ValueError):
        fused_linear_sva(hs, ws[:, :5], ht, wt, 4)
    with pytest.raises(ValueError):
        fused_linear_sva(hs, ws, ht[:3], wt, 4)
    with pytest.raises(ValueError):
        fused_linear_sva(hs, ws, ht, wt, 4, chunk_size=0)


def _batch(seed, t=40, s=7, d=4):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(t, generator=g)
    mask = torch.rand(t, generator=g) > 0.3
    idx = torch.sort(torch.randint(0, s, (t,), generator=g)).values
    dom = torch.randint(0, d, (s,), generator=g)
    return loss, mask, idx, dom


def test_objective_matches_reference_and_grad():
    for seed in range(5):
        loss, mask, idx, dom = _batch(seed)
        mask[idx == 2] = False  # a sample with no response token is not counted
        a = loss.clone().requires_grad_(True)
        out = domain_normalized_loss(a, mask, idx, dom, num_domains=4)
        out.loss.backward()
        b = loss.clone().requires_grad_(True)
        ref = domain_normalized_reference(b, mask, idx, dom)
        ref.backward()
        torch.testing.assert_close(out.value, ref.detach())
        torch.testing.assert_close(out.loss.detach(), ref.detach())
        torch.testing.assert_close(a.grad, b.grad)
        assert not a.grad[~mask].any()


def test_objective_domain_weighting_by_hand():
    # domain 0: samples 0 (mean 1) and 1 (mean 3) -> 2; domain 1: sample 2 (mean 10) -> 10.
    loss = torch.tensor([1.0, 1.0, 2.0, 4.0, 10.0, 99.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    dom = torch.tensor([0, 0, 1])
    out = domain_normalized_loss(loss, mask, idx, dom, num_domains=3)
    assert out.value.item() == pytest.approx(6.0)
    assert out.domain_samples.tolist() == [2.0, 1.0, 0.0]
    assert torch.isnan(out.domain_means[2])
    empty = domain_normalized_loss(loss, torch.zeros(6), idx, dom, num_domains=3)
    assert empty.value.item() == 0.0
