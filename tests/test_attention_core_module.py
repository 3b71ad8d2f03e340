"""PackedDotProductAttention against megatron-core's own DotProductAttention and per document.

Single process: ``megatron_a1.runtime.initialize()`` (gloo, world size 1; on CPU it installs the
CPU compatibility layer that megatron-core's DotProductAttention needs: its causal mask and
score buffer are placed on "cuda", its dropout forks the CUDA RNG tracker).
"""
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from a1_kernels.attention import packed_attention_reference
from megatron_a1.model.core_attention import PackedDotProductAttention
from megatron_a1.runtime import destroy, initialize


@pytest.fixture(scope="module", autouse=True)
def runtime():
    rt = initialize()
    yield rt
    destroy()


def _config(**kw):
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, attention_dropout=0.0, hidden_dropout=0.0,
                params_dtype=torch.float32, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.fixture(params=["triton", "torch-fallback"])
def path(request, monkeypatch):
    """Both execution paths: the Triton kernels, and (CPU without the interpreter) the
    per-document PyTorch reference the module falls back to."""
    if request.param == "torch-fallback":
        if torch.cuda.is_available():
            pytest.skip("the fallback serves CPU tensors only")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


@pytest.mark.parametrize("qk_layer_scaling", [False, True])
def test_matches_megatron_dot_product_attention(qk_layer_scaling, path):
    cfg = _config(apply_query_key_layer_scaling=qk_layer_scaling,
                  attention_softmax_in_fp32=True)
    ours = PackedDotProductAttention(cfg, layer_number=3, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self")
    theirs = DotProductAttention(cfg, layer_number=3, attn_mask_type=AttnMaskType.causal,
                                 attention_type="self")
    assert ours.softmax_scale == pytest.approx(theirs.softmax_scale)
    sq, b = 19, 2
    q = torch.randn(sq, b, 4, 16, requires_grad=True)
    k = torch.randn(sq, b, 2, 16, requires_grad=True)
    v = torch.randn(sq, b, 2, 16, requires_grad=True)
    out = ours(q, k, v, attention_mask=None)
    ref = theirs(q, k, v, attention_mask=None)
    assert out.shape == ref.shape == (sq, b, 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad(out, (q, k, v), do),
                     torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_thd_pack_matches_per_document_reference(path):
    cfg = _config()
    attn = PackedDotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self")
    cu = torch.tensor([0, 9, 10, 31], dtype=torch.int32)
    q, k, v = (torch.randn(31, h, 16) for h in (4, 2, 2))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=21, max_seqlen_kv=21)
    out = attn(q, k, v, None, packed_seq_params=params)
    ref = packed_attention_reference(q, k, v, cu, causal=True)
    assert out.shape == (31, 1, 64)
    torch.testing.assert_close(out, ref.reshape(31, 1, 64), atol=1e-5, rtol=1e-5)

    # Padded packs (cu_seqlens_q_padded): real tokens see only their own document.
    padded = torch.tensor([0, 12, 16, 40], dtype=torch.int32)
    qp, kp, vp = (torch.zeros(40, x.shape[1], 16) for x in (q, k, v))
    for src, dst in ((q, qp), (k, kp), (v, vp)):
        for i in range(3):
            dst[padded[i]:padded[i] + cu[i + 1] - cu[i]] = src[cu[i]:cu[i + 1]]
            dst[padded[i] + cu[i + 1] - cu[i]:padded[i + 1]] = torch.randn(1)  # junk padding
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                             max_seqlen_q=24, max_seqlen_kv=24)
    outp = attn(qp, kp, vp, None, packed_seq_params=params)
    for i in range(3):
        n = int(cu[i + 1] - cu[i])
        torch.testing.assert_close(outp[padded[i]:padded[i] + n], out[cu[i]:cu[i + 1]],
                                   atol=1e-6, rtol=1e-6)


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="dropout"):
        PackedDotProductAttention(_config(attention_dropout=0.1), 1, AttnMaskType.causal, "self")
    attn = PackedDotProductAttention(_config(), 1, AttnMaskType.causal, "self")
    x = torch.randn(4, 1, 4, 16)
    kv = torch.randn(4, 1, 2, 16)
    with pytest.raises(NotImplementedError, match="bias"):
        attn(x, kv, kv, None, attention_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="mask"):
        attn(x, kv, kv, torch.ones(1, 1, 4, 4, dtype=torch.bool),
             attn_mask_type=AttnMaskType.arbitrary)


def test_self_attention_layer_packed_equals_documents_alone():
    """megatron's SelfAttention built from a spec with our core attention: a THD pack gives the
    same output as each document run alone as an ordinary [s, 1, h] batch."""
    cfg = _config()
    spec = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=SelfAttentionSubmodules(
                          linear_qkv=ColumnParallelLinear,
                          core_attention=PackedDotProductAttention,
                          linear_proj=RowParallelLinear))
    from megatron.core.transformer.spec_utils import build_module

    layer = build_module(spec, config=cfg, layer_number=1)
    lens = [7, 1, 12]
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    hidden = torch.randn(20, 1, 64)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=12, max_seqlen_kv=12)
    packed, _ = layer(hidden, attention_mask=None, packed_seq_params=params)
    alone = torch.cat([layer(hidden[a:b], attention_mask=None)[0]
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert packed.shape == (sum(lens), 1, 64)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
