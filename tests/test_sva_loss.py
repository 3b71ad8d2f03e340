"""sva_loss (logits level) against the plain-PyTorch reference, under the Triton interpreter.

Tolerances: fp32 inputs — loss and gradient within 1e-5 absolute of the reference (same fp32
maths on the same k values). bf16/fp16 inputs — both sides read the same rounded logits and
compute in fp32, so the loss is within 1e-5; the gradient is returned in the input dtype, so it is
within one rounding of that dtype (rtol 2^-8 for bf16, 2^-11 for fp16) of the fp32 reference.
"""
import math

import pytest
import torch

import a1_kernels.sva.sva as sva_mod
from a1_kernels.sva import sva_loss
from a1_kernels.sva.reference import salient_set_reference, sva_loss_reference


def _inputs(n, v, seed, ties=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    if ties:
        t = (t * 2).round() / 2  # many exact ties in the teacher
    return s.to(dtype), t.to(dtype)


def _run(fn, s, t, k, grad_out=None, **kw):
    s = s.clone().requires_grad_(True)
    loss = fn(s, t, k, **kw)
    g = grad_out if grad_out is not None else torch.ones_like(loss)
    loss.backward(g)
    return loss.detach(), s.grad


@pytest.mark.parametrize("k,n,v", [(1, 13, 517), (2, 13, 517), (8, 13, 517), (64, 5, 517),
                                   (256, 3, 301)])
def test_matches_reference_fp32(k, n, v):
    s, t = _inputs(n, v, seed=k)
    grad_out = torch.linspace(0.5, 2.0, n)
    loss, grad = _run(sva_loss, s, t, k, grad_out)
    ref_loss, ref_grad = _run(sva_loss_reference, s, t, k, grad_out)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # The gradient lives on the teacher's top-k (lower id wins ties) and nowhere else.
    support = torch.zeros(n, v, dtype=torch.bool)
    support.scatter_(1, salient_set_reference(t, k), True)
    assert not grad[~support].any()
    if k == 1:  # one salient id: both renormalised distributions are 1 there
        assert not loss.any() and not grad.any()
    else:
        assert (loss > 0).all()


@pytest.mark.parametrize("k", [8, 64])
def test_bitonic_merge_path(monkeypatch, k):
    """The GPU's merge-by-bitonic-top-k branch (the interpreter default inserts one by one)."""
    monkeypatch.setattr(sva_mod, "SORT_MIN", 2)
    monkeypatch.setitem(sva_mod.INTERPRET_TOPK_CONFIG, "BLOCK_V", 128)
    n = 3 if k == 8 else 2
    s, t = _inputs(n, 333, seed=7 + k)
    keys = sva_mod.sva_topk_keys(t, torch.arange(n, dtype=torch.int32), k, 333, 0)
    values, ids = sva_mod.decode_keys(keys)
    ref_ids = salient_set_reference(t, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(values, torch.gather(t, 1, ref_ids))
    loss, grad = _run(sva_loss, s, t, k)
    ref_loss, ref_grad = _run(sva_loss_reference, s, t, k)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_adversarial_rows():
    k, v = 8, 203
    s, t = _inputs(10, v, seed=3)
    s[0], t[0] = s[0] * 1e4, t[0] * 1e4                   # huge magnitudes
    s[1, :50] = 3e38; t[1, 100:] = -3e38                  # near-overflow
    t[2] = -1e4; t[2, 77] = 0.0                           # one-hot teacher (finite)
    s[3] = t[3]                                           # identical student and teacher
    t[4] = 1.0                                            # all tied: S = ids 0..7
    t[5, 1::2] = float("-inf"); s[5, ::3] = float("-inf")  # -inf logits on both sides
    t[6] = 0.0; t[6, 190] = -0.0; t[6, :7] = -0.0         # -0.0 ties +0.0
    s[7, :] = float("-inf"); s[7, 5] = 1.0                # student mass on one id
    s[8] = float("nan"); t[8] = float("nan")              # masked out below: never read
    s[9] = float("-inf"); t[9] = float("-inf")            # masked out below
    mask = torch.ones(10, dtype=torch.bool)
    mask[8:] = False
    loss, grad = _run(sva_loss, s, t, k, mask=mask)
    ref_loss, ref_grad = _run(sva_loss_reference, s, t, k, mask=mask)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # ref_grad at masked NaN rows is nan * 0 = nan in autograd; ours skips them (grad 0).
    tight = [0, 1, 3, 4, 5, 6, 7]
    torch.testing.assert_close(grad[tight], ref_grad[tight], atol=1e-6, rtol=1e-5)
    # Row 2: log p̄_t ~ -1e4 on S, so c = p̄_s (diff - loss) cancels terms of size ~|loss|:
    # both sides are exact to fp32 relative to |loss|, not absolutely.
    torch.testing.assert_close(grad[2], ref_grad[2], atol=1e-6 * float(ref_loss[2]), rtol=1e-5)
    assert loss[3] == 0 and not grad[3].any()
    assert (loss[8:] == 0).all() and not grad[8:].any()


def test_identical_is_zero_and_one_hot_student_matches():
    s, t = _inputs(6, 129, seed=11, ties=False)
    loss, grad = _run(sva_loss, t, t, 16)
    assert loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6
    # Hand check of one row: k = 2, student favours the teacher's second choice.
    t1 = torch.tensor([[3.0, 1.0, 2.0, -5.0]])
    s1 = torch.tensor([[0.0, 9.0, math.log(3.0), 4.0]])
    ps = torch.tensor([0.25, 0.75])                 # student on S = {0, 2}
    pt = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    expected = (ps * (ps.log() - pt.log())).sum()
    torch.testing.assert_close(sva_loss(s1, t1, 2), expected[None], atol=1e-6, rtol=1e-6)


def test_vocab_size_excludes_padding():
    k, v, real = 8, 300, 257
    s, t = _inputs(7, v, seed=5)
    t[:, real:] = 100.0  # padded rows would win every top-k
    loss, grad = _run(sva_loss, s, t, k, vocab_size=real)
    ref_loss, ref_grad = _run(sva_loss_reference, s, t, k, vocab_size=real)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert not grad[:, real:].any()


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_low_precision(dtype, rtol):
    k = 16
    s, t = _inputs(9, 389, seed=9, dtype=dtype)
    loss, grad = _run(sva_loss, s, t, k)
    assert grad.dtype == dtype
    ref_loss, ref_grad = _run(sva_loss_reference, s.float(), t.float(), k)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-6, rtol=rtol)


def test_reference_gradcheck_float64():
    s, t = _inputs(4, 23, seed=1)
    s = s.double().requires_grad_(True)
    t = t.double()
    assert torch.autograd.gradcheck(lambda x: sva_loss_reference(x, t, 5), (s,))


def test_reference_against_explicit_formula():
    """The reference itself against the definition written as loops over the salient set."""
    s, t = _inputs(3, 17, seed=2)
    t[0, 3] = t[0, 9] = t[0].max() + 1  # tie at the top: 3 before 9
    ref = sva_loss_reference(s.double(), t.double(), 4)
    for i in range(3):
        order = sorted(range(17), key=lambda u: (-float(t[i, u]), u))[:4]
        if i == 0:
            assert order[:2] == [3, 9]
        zs = [float(s[i, u]) for u in order]
        zt = [float(t[i, u]) for u in order]
        ps = [math.exp(z) / sum(math.exp(x) for x in zs) for z in zs]
        pt = [math.exp(z) / sum(math.exp(x) for x in zt) for z in zt]
        expected = sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps, pt))
        assert abs(float(ref[i]) - expected) < 1e-12


def test_torch_compile_traces():
    s, t = _inputs(5, 130, seed=4)
    fn = torch.compile(lambda a, b: sva_loss(a, b, 4).sum(), backend="aot_eager")
    x = s.clone().requires_grad_(True)
    fn(x, t).backward()
    _, ref_grad = _run(sva_loss_reference, s, t, 4)
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_input_validation():
    s, t = _inputs(3, 40, seed=0)
    with pytest.raises(ValueError):
        sva_loss(s, t[:, :39], 4)
    with pytest.raises(ValueError):
        sva_loss(s, t, 41)
    with pytest.raises(ValueError):
        sva_loss(s, t, 4, vocab_size=3)
    with pytest.raises(TypeError):
        sva_loss(s.long(), t, 4)
    with pytest.raises(ValueError):
        sva_loss(s.t(), t.t(), 2)
