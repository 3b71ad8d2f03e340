"""Packed attention kernels against per-document SDPA (Triton interpreter on CPU).

Error convention (flash-attention's): the kernel's max error against an fp64 oracle must be at
most twice PyTorch's own error at the same dtype (standard attention computed in that dtype),
plus a rounding floor of 2 ulps at the tensor's largest magnitude.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a1_kernels.attention import batched_attention, packed_attention, packed_attention_reference
from a1_kernels.attention import ops

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def _pack(lengths, hq, hkv, d, dtype, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths) + extra_rows
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu


def _ragged(seed, n_docs, max_len):
    """Document lengths with 1, 0 and non-multiples of the tile among random ones."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, max_len, (n_docs,), generator=g).tolist()
    return [1] + lens[:1] + [0] + lens[1:] + [17]


def _standard_attention(q, k, v, cu, causal, scale):
    """PyTorch's attention computed the standard way at the inputs' dtype (flash-attention's
    ``attention_ref(upcast=False)``): scores and output matmuls in that dtype, softmax in fp32
    rounded back. The yardstick for "PyTorch's own error at the same dtype"."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        kk = k[a:b].repeat_interleave(group, 1)
        vv = v[a:b].repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b] * scale, kk)
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), -math.inf)
        p = s.float().softmax(-1).to(q.dtype)
        out = out.index_copy(0, torch.arange(a, b), torch.einsum("hqk,khd->qhd", p, vv))
    return out


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(lengths, hq, hkv, d, dtype, causal, extra_rows=0, seed=0, scale=None,
           deterministic=True):
    q, k, v, cu = _pack(lengths, hq, hkv, d, dtype, extra_rows, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = packed_attention(q, k, v, cu, max(lengths), causal=causal, softmax_scale=scale,
                           deterministic=deterministic)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)

    ref = packed_attention_reference(q, k, v, cu, causal=causal, softmax_scale=scale, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    pt = _standard_attention(q, k, v, cu, causal, scale)
    pt_grads = torch.autograd.grad(pt, (q, k, v), do)

    for name, ours, oracle, torch_same_dtype in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (pt, *pt_grads)
    ):
        assert ours.dtype == dtype and ours.shape == oracle.shape
        err, err_pt = _max_err(ours, oracle), _max_err(torch_same_dtype, oracle)
        # Plus the rounding floor (flash-attention 3's convention): max errors of a few ulps
        # are quantised on small tensors, so 1 ulp vs 2 ulps is not a defect.
        floor = max(FLOOR[dtype], 2 * torch.finfo(dtype).eps * oracle.abs().max().item())
        assert err <= 2 * err_pt + floor, f"{name}: {err:.3g} vs PyTorch {err_pt:.3g}"
    if extra_rows:  # rows past the last document: zero output, zero gradient
        n = int(cu[-1])
        assert out[n:].abs().max() == 0 and grads[0][n:].abs().max() == 0
        assert grads[1][n:].abs().max() == 0 and grads[2][n:].abs().max() == 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (8, 1)])
def test_ragged_pack_gqa(hq, hkv, causal):
    _check(_ragged(hq, 3, 30), hq, hkv, 16, torch.float32, causal, extra_rows=5, seed=hq)


@pytest.mark.parametrize("d,hq,hkv,dtype,causal", [
    (16, 4, 1, torch.float32, True), (16, 4, 1, torch.float32, False),
    (256, 2, 1, torch.float32, True), (32, 4, 2, torch.bfloat16, True)])
def test_atomic_dq_backward(d, hq, hkv, dtype, causal):
    """deterministic=False: the dK/dV kernel also adds each key tile's share of dQ with fp32
    atomics (5 matmuls; at head dim 256 two programs per key tile, each owning half the
    columns). Same oracle, ragged pack with empty and single-token documents, GQA, rows past
    the last document."""
    _check([1, 23, 0, 18, 1, 37], hq, hkv, d, dtype, causal, extra_rows=3, seed=d,
           deterministic=False)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_head_dims(d):
    _check([1, 23, 0, 18], 2, 1, d, torch.float32, causal=True, seed=d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_half_precision_error_bounded_by_pytorch(dtype, causal):
    _check(_ragged(7, 2, 50), 4, 2, 32, dtype, causal, seed=3)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_unequal_tiles(monkeypatch, tiles):
    """The GPU configs use BLOCK_M != BLOCK_N: the diagonal and ragged-end loops must agree."""
    monkeypatch.setattr(ops, "INTERPRET_TILES", tiles)
    _check([45, 1, 33, 0, 16], 2, 1, 16, torch.float32, causal=True, seed=11)
    _check([45, 7], 2, 1, 16, torch.float32, causal=False, seed=12)


def test_single_token_and_empty_documents():
    _check([1, 1, 0, 1, 0, 0, 1], 2, 2, 16, torch.float32, causal=True, extra_rows=3)


def test_softmax_scale():
    _check([20, 13], 2, 1, 16, torch.float32, causal=True, scale=0.3)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
@pytest.mark.parametrize("causal", [True, False])
def test_batched_layouts(layout, causal, deterministic):
    b, s, hq, hkv, d = 3, 21, 4, 2, 16
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64).float() for h in (hq, hkv, hkv))
    if layout == "sbhd":
        q, k, v = (x.transpose(0, 1).contiguous() for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = batched_attention(q, k, v, causal=causal, layout=layout, deterministic=deterministic)
    assert out.shape == q.shape and out.is_contiguous()

    def sdpa(q, k, v):  # [B, H, S, D] in, same layout as the inputs out
        to_bhsd = (lambda x: x.permute(0, 2, 1, 3)) if layout == "bshd" else (
            lambda x: x.permute(1, 2, 0, 3))
        qq, kk, vv = to_bhsd(q), to_bhsd(k), to_bhsd(v)
        o = torch.nn.functional.scaled_dot_product_attention(
            qq, kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1),
            is_causal=causal)
        return o.permute(0, 2, 1, 3) if layout == "bshd" else o.permute(2, 0, 1, 3)

    ref = sdpa(q.double(), k.double(), v.double())
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    for ours, oracle in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(ours.double(), oracle.double(), atol=2e-5, rtol=1e-4)


def test_strided_inputs_from_fused_qkv():
    """q, k, v as views of one fused projection (megatron's layout) give the same result."""
    t, hq, hkv, d = 37, 4, 2, 16
    fused = torch.randn(t, hq + 2 * hkv, d)
    q, k, v = fused[:, :hq], fused[:, hq:hq + hkv], fused[:, hq + hkv:]
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    out = packed_attention(q, k, v, cu, 20)
    ref = packed_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 20)
    assert torch.equal(out, ref)


def test_input_validation():
    q, k, v, cu = _pack([4, 4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        packed_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, 4)
    with pytest.raises(ValueError, match="head dim"):
        packed_attention(q[..., :12], k[..., :12], v[..., :12], cu, 4)
    with pytest.raises(ValueError, match="share"):
        packed_attention(q.half(), k, v, cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_attention(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        packed_attention(q, k, v, cu, 3)
    with pytest.raises(ValueError, match="layout"):
        batched_attention(q[None], k[None], v[None], layout="thd")
    with pytest.raises(ValueError, match="softmax_scale"):  # folded into exp2's FMA: needs > 0
        packed_attention(q, k, v, cu, 4, softmax_scale=0.0)


def test_registered_ops_fake_and_schema():
    """The custom ops have consistent fake implementations (what torch.compile traces)."""
    q, k, v, cu = _pack([5, 6], 2, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.a1_kernels.attention_fwd.default,
                          (q, k, v, cu, True, 0.25, False),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.a1_kernels.attention_fwd(q, k, v, cu, True, 0.25, False)
    torch.library.opcheck(torch.ops.a1_kernels.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, True, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.a1_kernels.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, True, 0.25, False),
                          test_utils=("test_schema", "test_faketensor"))
    # The saved log-sum-exp is the natural one, [H, T].
    scores = torch.einsum("thd,shd->hts", q[:5], k[:5].expand(-1, 2, -1)) * 0.25
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse[:, :5], scores.logsumexp(-1))


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(lengths=st.lists(st.integers(0, 24), min_size=2, max_size=5),
       target=st.integers(0, 4), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_no_leakage_between_documents(lengths, target, causal, seed):
    """Changing every other document changes nothing in one document: output or gradients."""
    target %= len(lengths)
    q, k, v, cu = _pack(lengths, 2, 1, 16, torch.float32, seed=seed)
    a, b = int(cu[target]), int(cu[target + 1])
    g = torch.Generator().manual_seed(seed + 1)
    others = torch.ones(q.shape[0], 1, 1, dtype=torch.bool)
    others[a:b] = False
    q2, k2, v2 = (torch.where(others, torch.randn(x.shape, generator=g) * 3, x)
                  for x in (q, k, v))
    do = torch.randn(q.shape, generator=g)
    results = []
    for qq, kk, vv in ((q, k, v), (q2, k2, v2)):
        qq, kk, vv = (x.clone().requires_grad_() for x in (qq, kk, vv))
        out = packed_attention(qq, kk, vv, cu, max(lengths + [1]), causal=causal)
        grads = torch.autograd.grad(out, (qq, kk, vv), do)
        results.append([x[a:b] for x in (out, *grads)])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("d,hq,hkv,causal,deterministic", [
    (32, 4, 2, True, True), (32, 4, 2, False, True), (64, 4, 1, False, True),
    (128, 2, 1, True, True), (256, 2, 1, True, True), (32, 4, 2, True, False)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN rows in the interpreter's numpy
def test_tma_path_equals_pointer_path(monkeypatch, d, hq, hkv, causal, deterministic):
    """sm_90's loads through ragged TMA descriptors (``A1_ATTENTION_TMA=1`` runs them in the
    interpreter) give bit for bit the pointer path's outputs and gradients, with a non-finite
    value in one document and NaN in the rows past the last: a descriptor bounded per document
    never lets a neighbour's rows in."""
    lengths = [1, 23, 0, 18, 1, 37]
    q, k, v, cu = _pack(lengths, hq, hkv, d, torch.bfloat16, extra_rows=5, seed=d)
    n = int(cu[-1])
    for x in (q, k, v):
        x[n:] = float("nan")
    v[0, 0, 0] = float("inf")  # document 0 is the single token at row 0
    g = torch.Generator().manual_seed(1)
    do = torch.randn(q.shape, generator=g).to(torch.bfloat16)
    do[n:] = float("nan")
    described = []
    real_descriptor = ops.tma_descriptor
    monkeypatch.setattr(ops, "tma_descriptor", lambda x: described.append(x) or real_descriptor(x))

    def run(mode):
        monkeypatch.setenv(ops.TMA_ENV, mode)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = packed_attention(qq, kk, vv, cu, max(lengths), causal=causal,
                               deterministic=deterministic)
        return [x[:n] for x in (out, *torch.autograd.grad(out, (qq, kk, vv), do))]

    pointers = run("0")
    assert not described
    tma = run("1")
    assert described  # the TMA path ran
    for name, a, b in zip(("out", "dq", "dk", "dv"), pointers, tma):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=name)
        assert torch.isfinite(b[1:]).all(), name  # the documents after the non-finite one


def test_tma_for_views_of_a_fused_projection(monkeypatch):
    """q, k, v as views of one fused projection (megatron's layout: heads not adjacent in k/v)
    are copied once into TMA-addressable tensors where TMA is on, and give the pointer path's
    results."""
    t, hkv, g, d = 37, 2, 2, 16
    fused = torch.randn(t, hkv, (g + 2) * d).to(torch.bfloat16)  # [t, groups, (g + 2) * d]
    q = fused[..., :g * d].reshape(t, hkv * g, d)
    k, v = fused[..., g * d:(g + 1) * d], fused[..., (g + 1) * d:]
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    assert ops.tma_view(k) is None and ops.tma_view(v) is None
    described = []
    real_descriptor = ops.tma_descriptor
    monkeypatch.setattr(ops, "tma_descriptor", lambda x: described.append(x) or real_descriptor(x))
    outs = []
    for mode in ("0", "1"):
        monkeypatch.setenv(ops.TMA_ENV, mode)
        outs.append(packed_attention(q, k, v, cu, 20))
    assert len(described) == 3  # q, k, v of the forward
    assert torch.equal(outs[0], outs[1])


def test_tma_only_where_a_descriptor_can_address(monkeypatch):
    """Tensors TMA cannot address (heads not adjacent, rows not 16-byte aligned) and fp32 keep
    the pointer path."""
    monkeypatch.setenv(ops.TMA_ENV, "1")
    x = torch.zeros(40, 4, 32, dtype=torch.bfloat16)
    assert ops.use_tma("fwd", 32, torch.bfloat16, x, x)
    assert ops.tma_view(x) == (40, 128)
    assert not ops.use_tma("fwd", 32, torch.float32, x.float())
    fused = torch.zeros(40, 6, 32, dtype=torch.bfloat16)  # q, k, v views of one projection
    assert ops.tma_view(fused[:, :4]) == (40, 192)
    assert ops.tma_view(torch.zeros(40, 4, 64, dtype=torch.bfloat16)[..., :32]) is None
    assert ops.tma_view(torch.zeros(40 * 4 * 32 + 1, dtype=torch.bfloat16)[1:].view(40, 4, 32)) is None
    sbhd = torch.zeros(8, 5, 4, 32, dtype=torch.bfloat16).transpose(0, 1)  # batches interleaved
    assert ops.tma_view(sbhd) is None and ops.tma_view(sbhd.contiguous()) == (40, 128)
    assert not ops.use_tma("bwd", 32, torch.bfloat16, x)  # the atomic-dQ backward: pointers
    monkeypatch.setenv(ops.TMA_ENV, "0")
    assert not ops.use_tma("fwd", 32, torch.bfloat16, x)
    monkeypatch.setenv(ops.TMA_ENV, "yes")
    with pytest.raises(ValueError, match="A1_ATTENTION_TMA"):
        ops.use_tma("fwd", 32, torch.bfloat16, x)
