"""megatron_a1's ``GatedDeltaNet`` (upstream's module on our PyTorch ops) on CPU, without fla.

* a packed THD batch gives the same outputs and gradients as each document run alone;
* each document gives the same output as transformers' ``Qwen3_5MoeGatedDeltaNet`` with the
  same weights (the layer-level oracle, and a check of the weight layout the converter needs);
* unsupported combinations fail clearly.

megatron-core needs a process group and its parallel state even on one process: the fixture uses
``megatron_a1.runtime.initialize`` (gloo, world size 1, CPU compatibility layer).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

if sys.modules.get("fla") is not None:
    pytest.skip("fla was imported before transformers could be guarded", allow_module_level=True)
sys.modules["fla"] = None
sys.modules.setdefault("causal_conv1d", None)

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402

from megatron_a1.model import gdn  # noqa: E402
from megatron_a1.model.norms import RMSNorm  # noqa: E402

HIDDEN, NK, NV, DK, DV = 32, 2, 4, 8, 8
LENGTHS = [5, 1, 23, 11]


@pytest.fixture(scope="module")
def pg_collection():
    from megatron_a1.runtime import destroy, initialize

    rt = initialize(seed=1)
    yield rt.pg_collection
    destroy()


def gdn_spec():
    return ModuleSpec(
        module=gdn.GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(
            in_proj=ColumnParallelLinear, out_norm=RMSNorm, out_proj=RowParallelLinear
        ),
    )


@pytest.fixture(scope="module")
def module(pg_collection):
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, normalization="RMSNorm",
        layernorm_epsilon=1e-6, linear_conv_kernel_dim=4, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_num_key_heads=NK, linear_num_value_heads=NV,
        activation_func=F.silu, params_dtype=torch.float32, use_cpu_initialization=True,
    )
    torch.manual_seed(0)
    m = build_module(gdn_spec(), config=config, layer_number=1, pg_collection=pg_collection)
    with torch.no_grad():  # non-trivial norm weights, so a layout mistake shows
        m.out_norm.weight.uniform_(0.5, 1.5)
    return m


def packed_params(cu):
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))


def test_builds_without_fla_with_upstream_parameters(module):
    assert not gdn.HAVE_FLA  # this machine: fla is not installed
    names = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert names == {
        "in_proj.weight": (2 * NK * DK + 2 * NV * DV + 2 * NV, HIDDEN),
        "conv1d.weight": (2 * NK * DK + NV * DV, 1, 4),
        "dt_bias": (NV,),
        "A_log": (NV,),
        "out_norm.weight": (DV,),
        "out_proj.weight": (HIDDEN, NV * DV),
    }
    assert module.gated_delta_rule is gdn._chunk_gated_delta_rule


def test_packed_forward_and_grads_equal_each_document_alone(module):
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    T = cu[-1].item()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, 1, HIDDEN, generator=gen, requires_grad=True)
    dy = torch.randn(T, 1, HIDDEN, generator=gen)

    module.zero_grad()
    out, bias = module(x, None, packed_seq_params=packed_params(cu))
    assert bias is None and out.shape == (T, 1, HIDDEN)
    (out * dy).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    packed_dx = x.grad.clone()

    module.zero_grad()
    x.grad = None
    for n in range(len(LENGTHS)):
        a, b = cu[n].item(), cu[n + 1].item()
        out_n, _ = module(x[a:b], None)  # [s, b, h] with no packing: one sequence
        torch.testing.assert_close(out[a:b], out_n, rtol=1e-5, atol=1e-6)
        (out_n * dy[a:b]).sum().backward()  # gradients accumulate over the documents
    torch.testing.assert_close(packed_dx, x.grad, rtol=1e-5, atol=1e-6)
    for name, p in module.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_each_document_matches_transformers_layer(module):
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    hf_config = Qwen3_5MoeTextConfig(
        hidden_size=HIDDEN, num_hidden_layers=1, layer_types=["linear_attention"],
        linear_num_key_heads=NK, linear_num_value_heads=NV, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_conv_kernel_dim=4, hidden_act="silu", rms_norm_eps=1e-6,
    )
    ref = hf.Qwen3_5MoeGatedDeltaNet(hf_config, layer_idx=0)
    # megatron's in_proj rows are [q | k | v | z | beta | alpha]; out_norm here is not zero-centred
    qkv, z, b, a = module.in_proj.weight.detach().split(
        [2 * NK * DK + NV * DV, NV * DV, NV, NV]
    )
    with torch.no_grad():
        for dst, src in [
            (ref.in_proj_qkv.weight, qkv), (ref.in_proj_z.weight, z), (ref.in_proj_b.weight, b),
            (ref.in_proj_a.weight, a), (ref.conv1d.weight, module.conv1d.weight),
            (ref.dt_bias, module.dt_bias), (ref.A_log, module.A_log),
            (ref.norm.weight, module.out_norm.weight), (ref.out_proj.weight, module.out_proj.weight),
        ]:
            dst.copy_(src)

    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    x = torch.randn(cu[-1].item(), 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, _ = module(x, None, packed_seq_params=packed_params(cu))
        for n in range(len(LENGTHS)):
            a, e = cu[n].item(), cu[n + 1].item()
            out_hf = ref(x[a:e].transpose(0, 1))  # transformers is [b, s, h]
            torch.testing.assert_close(out[a:e].transpose(0, 1), out_hf, rtol=1e-5, atol=1e-5)


def test_context_parallel_is_refused_on_the_torch_path(module, monkeypatch):
    # A CP group cannot exist in one process; fake its size on this instance only.
    monkeypatch.setattr(module, "cp_size", 2)
    with pytest.raises(NotImplementedError, match="context parallelism"):
        module(torch.zeros(4, 1, HIDDEN), None)


def test_rebind_refuses_names_upstream_no_longer_uses():
    def f():
        return causal_conv1d  # noqa: F821

    marker = object()
    assert gdn._rebind(f, causal_conv1d=marker)() is marker
    with pytest.raises(RuntimeError, match="no longer refers"):
        gdn._rebind(f, l2norm=None)
