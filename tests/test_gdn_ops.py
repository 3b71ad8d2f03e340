"""The PyTorch Gated DeltaNet ops against the naive per-token oracle, on ragged packs.

Covers: values and gradients of the chunked rule vs the naive recurrence (float64 tight, float32
~1e-5), grouped value heads, initial/final states per document, packed == each document alone,
and the causal conv never reading across a document boundary.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_a1.model.gated_delta_rule import causal_conv1d, chunk_gated_delta_rule, l2norm
from megatron_a1.model.gated_delta_rule_reference import (
    naive_causal_conv1d,
    naive_gated_delta_rule,
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (fla's style of relative error)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(lengths, H, HV, K, V, dtype, seed, requires_grad=False, with_state=False):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    inputs = dict(
        q=rnd(1, T, H, K),
        k=rnd(1, T, H, K),
        v=rnd(1, T, HV, V),
        # log-decay in [-1, 0) with some near 0 (slow decay: long memory) and beta in (0, 1)
        g=F.logsigmoid(rnd(1, T, HV) + 2.0).to(dtype),
        beta=torch.rand(1, T, HV, generator=gen, dtype=torch.float64).to(dtype),
    )
    if with_state:
        inputs["initial_state"] = rnd(len(lengths), HV, K, V)
    if requires_grad:
        for t in inputs.values():
            t.requires_grad_(True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return inputs, cu


def run_with_grads(fn, inputs, **kwargs):
    """Output, final state and the gradients of a fixed random loss over both."""
    o, s = fn(**inputs, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    # the same weights whatever the dtype
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return o.detach(), s.detach(), dict(zip(inputs, grads))


# ragged packs: single token docs, docs shorter/longer than a chunk, not multiples of it
PACKS = [
    [1],
    [37],
    [16, 16],
    [1, 5, 17, 33, 2],
    [40, 1, 1, 23],
]
HEADS = [(2, 2), (1, 4), (2, 6)]  # (query/key heads, value heads): GVA ratios 1, 4, 3


@pytest.mark.parametrize("lengths", PACKS, ids=lambda l: "docs" + "-".join(map(str, l)))
@pytest.mark.parametrize("H,HV", HEADS, ids=lambda x: str(x))
def test_chunked_matches_naive_float64_values_and_grads(lengths, H, HV):
    inputs, cu = make_inputs(lengths, H, HV, K=8, V=6, dtype=torch.float64, seed=len(lengths) + HV,
                             requires_grad=True, with_state=True)
    kwargs = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, s, grads = run_with_grads(chunk_gated_delta_rule, inputs, chunk_size=16, **kwargs)
    o_ref, s_ref, grads_ref = run_with_grads(naive_gated_delta_rule, inputs, **kwargs)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-10, name


def test_chunked_matches_naive_float32():
    lengths = [3, 70, 1, 29]
    inputs, cu = make_inputs(lengths, 2, 4, K=16, V=8, dtype=torch.float32, seed=7,
                             requires_grad=True, with_state=True)
    # oracle in float64 from the same float32 inputs
    inputs64 = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    o_ref, s_ref, grads_ref = run_with_grads(naive_gated_delta_rule, inputs64, cu_seqlens=cu,
                                             use_qk_l2norm_in_kernel=True)
    for chunk_size in (4, 16, 64):
        o, s, grads = run_with_grads(chunk_gated_delta_rule, inputs, cu_seqlens=cu,
                                     use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)
        assert o.dtype == torch.float32 and s.dtype == torch.float32
        assert rel_err(o.double(), o_ref) < 1e-5, chunk_size
        assert rel_err(s.double(), s_ref) < 1e-5, chunk_size
        for name in grads:
            assert rel_err(grads[name].double(), grads_ref[name]) < 2e-5, (chunk_size, name)


def test_unpacked_batch_and_scale_and_no_l2norm():
    """B > 1 without cu_seqlens: each row is a sequence; explicit scale; raw q/k."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 3, 21, 2, 4, 8, 8
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.7, output_final_state=True, chunk_size=8)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, scale=0.7, output_final_state=True)
    assert o.shape == (B, T, HV, V) and s.shape == (B, HV, K, V)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_bfloat16_output_dtype_and_accuracy():
    inputs, cu = make_inputs([30, 9], 2, 2, K=16, V=16, dtype=torch.bfloat16, seed=5)
    o, s = chunk_gated_delta_rule(**inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                                  output_final_state=True)
    o_ref, _ = naive_gated_delta_rule(**{k: v.double() for k, v in inputs.items()}, cu_seqlens=cu,
                                      use_qk_l2norm_in_kernel=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o.double(), o_ref) < 1e-2  # bf16 output rounding only


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 45), min_size=1, max_size=5),
    heads=st.sampled_from(HEADS),
    chunk_size=st.sampled_from([8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_packed_equals_each_document_alone(lengths, heads, chunk_size, seed):
    H, HV = heads
    inputs, cu = make_inputs(lengths, H, HV, K=8, V=4, dtype=torch.float64, seed=seed,
                             with_state=True)
    o, s = chunk_gated_delta_rule(**inputs, cu_seqlens=cu, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        alone = {k: v[:, a:b] for k, v in inputs.items() if k != "initial_state"}
        o_n, s_n = chunk_gated_delta_rule(**alone, initial_state=inputs["initial_state"][n : n + 1],
                                          output_final_state=True, use_qk_l2norm_in_kernel=True,
                                          chunk_size=chunk_size)
        torch.testing.assert_close(o[:, a:b], o_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s[n : n + 1], s_n, rtol=1e-12, atol=1e-12)


def test_state_resets_at_document_start():
    """Changing document 0 must not change document 1's output at all (and does change doc 0)."""
    inputs, cu = make_inputs([20, 15], 2, 2, K=8, V=8, dtype=torch.float64, seed=3)
    o, _ = chunk_gated_delta_rule(**inputs, cu_seqlens=cu, chunk_size=16)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["v"][:, :20] += 1.0
    o2, _ = chunk_gated_delta_rule(**changed, cu_seqlens=cu, chunk_size=16)
    assert torch.equal(o[:, 20:], o2[:, 20:])
    assert not torch.allclose(o[:, :20], o2[:, :20])


def test_empty_document_keeps_its_initial_state():
    inputs, _ = make_inputs([6, 5], 1, 2, K=4, V=4, dtype=torch.float64, seed=1, with_state=True)
    cu = torch.tensor([0, 6, 6, 11], dtype=torch.int32)
    h0 = torch.cat([inputs.pop("initial_state")[:1], torch.randn(2, 2, 4, 4, dtype=torch.float64)])
    o, s = chunk_gated_delta_rule(**inputs, initial_state=h0, cu_seqlens=cu, output_final_state=True)
    o_ref, s_ref = naive_gated_delta_rule(**inputs, initial_state=h0, cu_seqlens=cu,
                                          output_final_state=True)
    torch.testing.assert_close(s[1], h0[1], rtol=0, atol=0)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32)), "rise from 0"),
        (dict(cu_seqlens=torch.tensor([0, 7, 5, 10], dtype=torch.int32)), "rise from 0"),
        (dict(v=torch.zeros(1, 10, 3, 4)), "multiple"),
        (dict(g=torch.zeros(1, 10, 3)), "g must be"),
        (dict(initial_state=torch.zeros(1, 2, 4, 4)), "initial_state"),
    ],
)
def test_input_validation(change, match):
    args = dict(q=torch.zeros(1, 10, 2, 4), k=torch.zeros(1, 10, 2, 4), v=torch.zeros(1, 10, 2, 4),
                g=torch.zeros(1, 10, 2), beta=torch.zeros(1, 10, 2),
                cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(**args)


def test_packed_needs_batch_one():
    x = torch.zeros(2, 5, 1, 4)
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(x, x, x, x[..., 0], x[..., 0],
                               cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_l2norm_matches_formula_and_keeps_dtype():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(l2norm(x), x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6))
    xb = x.to(torch.bfloat16)
    assert l2norm(xb).dtype == torch.bfloat16
    assert l2norm(xb, output_dtype=torch.float32).dtype == torch.float32
    tiny = torch.zeros(1, 4)
    assert torch.equal(l2norm(tiny), tiny)  # eps keeps zero vectors finite


# ----------------------------------------------------------------------------------------------
# causal conv1d
# ----------------------------------------------------------------------------------------------
def conv_inputs(lengths, D, W, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    x = torch.randn(1, T, D, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(D, W, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(D, generator=gen, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return x, w, b, cu


@pytest.mark.parametrize("lengths", PACKS, ids=lambda l: "docs" + "-".join(map(str, l)))
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_naive_values_and_grads(lengths, activation):
    x, w, b, cu = conv_inputs(lengths, D=6, W=4, seed=len(lengths))
    for t in (x, w, b):
        t.requires_grad_(True)
    y, state = causal_conv1d(x, w, b, activation=activation, cu_seqlens=cu)
    y_ref = naive_causal_conv1d(x, w, b, activation=activation, cu_seqlens=cu)
    assert state is None
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), W=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_conv_packed_equals_each_document_alone_and_torch_conv(lengths, W, seed):
    """Per document: the same as nn.Conv1d with padding W-1 cut to T (megatron's torch path)."""
    x, w, b, cu = conv_inputs(lengths, D=5, W=W, seed=seed)
    y, _ = causal_conv1d(x, w, b, activation="swish", cu_seqlens=cu)
    for n in range(len(lengths)):
        a, e = cu[n].item(), cu[n + 1].item()
        alone, _ = causal_conv1d(x[:, a:e], w, b, activation="silu")
        torch.testing.assert_close(y[:, a:e], alone, rtol=1e-12, atol=1e-12)
        conv = F.conv1d(x[:, a:e].transpose(1, 2), w.unsqueeze(1), b, padding=W - 1, groups=5)
        torch.testing.assert_close(alone, F.silu(conv[..., : e - a]).transpose(1, 2))


def test_conv_seq_idx_equals_cu_seqlens_and_batch_rows_are_independent():
    x, w, b, cu = conv_inputs([3, 8, 1, 6], D=4, W=4, seed=0)
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 8, 1, 6])).unsqueeze(0)
    y_cu, _ = causal_conv1d(x, w, b, cu_seqlens=cu)
    y_idx, _ = causal_conv1d(x, w, b, seq_idx=seq_idx.int())
    torch.testing.assert_close(y_cu, y_idx, rtol=0, atol=0)
    xb = torch.randn(2, 9, 4, dtype=torch.float64)
    yb, _ = causal_conv1d(xb, w, b)
    torch.testing.assert_close(yb[1:], causal_conv1d(xb[1:], w, b)[0], rtol=0, atol=0)


def test_conv_boundary_is_not_read():
    """A huge value at the end of document 0 must not reach document 1."""
    x, w, b, cu = conv_inputs([5, 5], D=3, W=4, seed=1)
    y, _ = causal_conv1d(x, w, b, cu_seqlens=cu)
    x2 = x.clone()
    x2[:, 4] = 1e6
    y2, _ = causal_conv1d(x2, w, b, cu_seqlens=cu)
    assert torch.equal(y[:, 5:], y2[:, 5:])
    assert (y2[:, 4] - y[:, 4]).abs().min() > 1.0


def test_conv_dtype_and_unsupported_arguments():
    x, w, b, cu = conv_inputs([4, 4], D=3, W=4, seed=2, dtype=torch.bfloat16)
    y, _ = causal_conv1d(x, w, b, activation="silu", cu_seqlens=cu)
    assert y.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="initial_state"):
        causal_conv1d(x, w, initial_state=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="not both"):
        causal_conv1d(x, w, cu_seqlens=cu, seq_idx=torch.zeros(1, 8, dtype=torch.int32))


def test_chunk_layout_pads_only_each_documents_last_chunk():
    """One long and many short documents: memory follows the tokens, not docs x longest doc."""
    from megatron_a1.model.gated_delta_rule import _chunk_layout

    lengths = [3, 200, 1, 64, 65]
    order, slot_of_token, steps = _chunk_layout(lengths, 64)
    assert order.tolist() == [1, 4, 3, 0, 2]  # longest first, stable
    assert steps[-1][0] == 1 + 4 + 1 + 1 + 2  # chunks in total: sum of ceil(len / 64)
    assert [m for _, m in steps] == [5, 2, 1, 1]  # documents still running at each step
    assert len(set(slot_of_token.tolist())) == sum(lengths)  # every token its own slot
