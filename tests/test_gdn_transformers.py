"""The PyTorch Gated DeltaNet ops against transformers' own torch implementation (Qwen3.5-MoE).

transformers binds fla's kernels at import whenever fla is importable (DESIGN §6); block it so
the oracle is its PyTorch code, and unwrap the hub-kernel decorators to be sure.
"""
import sys

import pytest
import torch

if sys.modules.get("fla") is not None:  # imported by an earlier test: transformers may bind it
    pytest.skip("fla was imported before transformers could be guarded", allow_module_level=True)
sys.modules["fla"] = None
sys.modules.setdefault("causal_conv1d", None)

from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf  # noqa: E402

from megatron_a1.model.gated_delta_rule import (  # noqa: E402
    causal_conv1d,
    chunk_gated_delta_rule,
    l2norm,
)


def torch_only(fn):
    return getattr(fn, "__wrapped__", fn)


HF_CHUNK = torch_only(hf.torch_chunk_gated_delta_rule)
HF_RECURRENT = torch_only(hf.torch_recurrent_gated_delta_rule)
HF_CONV = torch_only(hf.causal_conv1d_fn)


def pack(lengths, H, HV, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.randn(1, T, H, K, generator=gen)
    v = torch.randn(1, T, HV, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, generator=gen) + 2)
    beta = torch.rand(1, T, HV, generator=gen)
    h0 = torch.randn(len(lengths), HV, K, V, generator=gen)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return (q, k, v, g, beta), h0, cu


def rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("lengths,H,HV", [([1, 64, 30, 97], 2, 4), ([50, 7], 3, 3), ([129], 1, 2)])
def test_matches_transformers_chunk_and_recurrent_per_document(lengths, H, HV):
    tensors, h0, cu = pack(lengths, H, HV, K=16, V=8, seed=sum(lengths))
    o, s = chunk_gated_delta_rule(*tensors, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        doc = [t[:, a:b] for t in tensors]
        for oracle in (HF_CHUNK, HF_RECURRENT):
            o_hf, s_hf = oracle(*doc, initial_state=h0[n : n + 1], output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
            assert rel_err(o[:, a:b], o_hf) < 1e-5, (oracle.__name__, n)
            assert rel_err(s[n : n + 1], s_hf) < 1e-5, (oracle.__name__, n)


def test_gradients_match_transformers_chunk():
    tensors, h0, cu = pack([40, 25], 2, 4, K=8, V=8, seed=11)
    ours = [t.clone().requires_grad_(True) for t in tensors]
    theirs = [t.clone().requires_grad_(True) for t in tensors]
    o, _ = chunk_gated_delta_rule(*ours, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
    (o * w).sum().backward()
    for n in range(2):
        a, b = cu[n].item(), cu[n + 1].item()
        o_hf, _ = HF_CHUNK(*[t[:, a:b] for t in theirs], use_qk_l2norm_in_kernel=True)
        (o_hf * w[:, a:b]).sum().backward()
    for name, x, y in zip("q k v g beta".split(), ours, theirs):
        assert rel_err(x.grad, y.grad) < 1e-5, name


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_transformers_per_document(activation):
    gen = torch.Generator().manual_seed(0)
    lengths, D = [1, 3, 17, 6], 12
    x = torch.randn(1, sum(lengths), D, generator=gen)
    w, b = torch.randn(D, 4, generator=gen), torch.randn(D, generator=gen)
    cu = torch.tensor([0, 1, 4, 21, 27], dtype=torch.int32)
    y, _ = causal_conv1d(x, w, b, activation=activation, cu_seqlens=cu)
    for n in range(len(lengths)):
        a, e = cu[n].item(), cu[n + 1].item()
        y_hf = HF_CONV(x[:, a:e].transpose(1, 2), w, b, activation=activation).transpose(1, 2)
        torch.testing.assert_close(y[:, a:e], y_hf, rtol=1e-6, atol=1e-6)


def test_l2norm_matches_transformers():
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(l2norm(x), hf.l2norm(x, dim=-1, eps=1e-6), rtol=1e-6, atol=1e-7)
