"""GPU suite (``pytest -m gpu``): the kernels compiled for the real device against their
PyTorch references, at shapes near the model's, with bf16 tolerances.

Skipped without CUDA (``tests/conftest.py``). The same oracles as the interpreter tests; what
only a GPU shows — the compiled code's numerics, autotuned configs, realistic sizes — is here.
"""
from __future__ import annotations

import pytest
import torch

from a1_kernels.attention import packed_attention, packed_attention_reference
from a1_kernels.sva import fused_linear_sva, sva_loss
from a1_kernels.sva.reference import fused_linear_sva_reference, sva_loss_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("tma", ["auto", "0"])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_bf16_against_fp64_reference(monkeypatch, d, causal, deterministic, tma):
    """Agent-like pack (many short tool turns + long documents), GQA 16:2, error within 2x of
    PyTorch's own bf16 attention error against the fp64 reference (flash-attention's rule).
    Both backwards: dQ by its own kernel (7 matmuls) and by fp32 atomics (5 matmuls); loads by
    TMA (sm_90+) and by pointers (``A1_ATTENTION_TMA=0``)."""
    monkeypatch.setenv("A1_ATTENTION_TMA", tma)
    g = torch.Generator().manual_seed(d)
    lengths = [1, 37, 512, 3000, 64, 4096, 255, 1500]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    t = int(cu[-1])
    q = torch.randn(t, 16, d, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    k = torch.randn(t, 2, d, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    v = torch.randn(t, 2, d, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    do = torch.randn(t, 16, d, generator=g).to(DEVICE, torch.bfloat16)

    out = packed_attention(q, k, v, cu, max(lengths), causal=causal, deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = packed_attention_reference(q, k, v, cu, causal=causal, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    pt = packed_attention_reference(q, k, v, cu, causal=causal)  # PyTorch in bf16
    pt_grads = torch.autograd.grad(pt, (q, k, v), do)

    assert _max_err(out, ref) <= 2 * _max_err(pt, ref) + 1e-3
    for got, want, base in zip(grads, ref_grads, pt_grads):
        assert _max_err(got, want) <= 2 * _max_err(base, want) + 1e-3
    if deterministic:  # bitwise reproducible
        again = torch.autograd.grad(packed_attention(q, k, v, cu, max(lengths), causal=causal),
                                    (q, k, v), do)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("k", [32, 64])
def test_sva_loss_bf16_large_vocab(k):
    g = torch.Generator().manual_seed(k)
    n, v = 1024, 248_320
    s = (torch.randn(n, v, generator=g) * 3).to(DEVICE, torch.bfloat16).requires_grad_()
    t = (torch.randn(n, v, generator=g) * 3).to(DEVICE, torch.bfloat16)
    loss = sva_loss(s, t, k, vocab_size=248_077)
    (gs,) = torch.autograd.grad(loss.sum(), s)
    ref = sva_loss_reference(s.float(), t.float(), k, vocab_size=248_077)
    (gr,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gs.float(), gr.float(), rtol=2e-2, atol=1e-3)


def test_fused_linear_sva_bf16_matches_unfused():
    g = torch.Generator().manual_seed(0)
    t, h, v, k = 2048, 2048, 32_768, 64
    hs = (torch.randn(t, h, generator=g) / h**0.5).to(DEVICE, torch.bfloat16).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * 0.5).to(DEVICE, torch.bfloat16).requires_grad_()
    ht = (torch.randn(t, h, generator=g) / h**0.5).to(DEVICE, torch.bfloat16)
    wt = (torch.randn(v, h, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    mask = torch.rand(t, generator=g).to(DEVICE) > 0.3
    loss = fused_linear_sva(hs, ws, ht, wt, k, chunk_size=512, mask=mask)
    gh, gw = torch.autograd.grad(loss.sum(), (hs, ws))
    ref = fused_linear_sva_reference(hs.float(), ws.float(), ht.float(), wt.float(), k, mask=mask)
    rh, rw = torch.autograd.grad(ref.sum(), (hs, ws))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=5e-2, atol=5e-3)
