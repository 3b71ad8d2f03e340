"""Layer specs for the Agents-A1 hybrid stack on megatron-core's ``HybridModel``.

The layer pattern (``G`` Gated DeltaNet, ``*`` gated full attention, ``E`` MoE) decides which
spec each layer uses; every implementation choice comes from one backend provider
(:func:`megatron_a1.model.backends.get_backend`), never from conditionals in the layers.
"""
from __future__ import annotations

import copy

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_a1.model.gdn import GatedDeltaNet


class A1HybridStack(HybridStack):
    """``HybridStack`` whose final norm comes from the backend provider.

    Upstream hard-codes Transformer Engine's ``TENorm`` for the final norm, which does not exist
    without TE. We build the stack without it and add the provider's norm under the same name
    (``final_norm``), so the forward pass and checkpoint keys are upstream's.
    """

    def __init__(self, *args, final_norm=None, post_layer_norm: bool = True, **kwargs):
        super().__init__(*args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )


def _attention_layer(backend: BackendSpecProvider) -> ModuleSpec:
    norm = backend.layer_norm(rms_norm=True)
    qk_norm = backend.layer_norm(rms_norm=True, for_qk=True)
    fused = backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=(
                        backend.column_parallel_layer_norm_linear()
                        if fused
                        else backend.column_parallel_linear()
                    ),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=_fused_norm_keys("linear_qkv") if fused else {},
        ),
    )


def _fused_norm_keys(linear: str) -> dict[str, str]:
    """Checkpoint keys independent of the backend: with Transformer Engine the pre-norm lives
    inside the fused norm+linear (``...{linear}.layer_norm_weight``); it is saved and loaded
    under the local backend's name (``input_layernorm.weight``), megatron-core's own mechanism
    for TE/local checkpoint compatibility, so one converted checkpoint serves both."""
    return {f"self_attention.{linear}.layer_norm_": "input_layernorm."}


def plain_norm(norm: type) -> type:
    """``norm`` built as if ``layernorm_zero_centered_gamma`` were False: ``y = w * x / rms(x)``.

    The Gated DeltaNet's gated output norm (transformers' ``Qwen3_5MoeRMSNormGated``, weight
    initialised to ones) is not zero-centred, while every other norm of the model is. The
    provider's norm reads the switch from the config, so this builder hands it a shallow copy of
    the config with the switch off (works for our RMSNorm and for TE's ``TENorm``, whose
    ``__new__`` returns a TE module). Keeping the reference's parametrisation, not ``w - 1``,
    keeps checkpoint conversion bit-exact.
    """

    class PlainNorm:
        def __new__(cls, config, hidden_size, eps=1e-6, **kwargs):
            config = copy.copy(config)
            config.layernorm_zero_centered_gamma = False
            return norm(config=config, hidden_size=hidden_size, eps=eps, **kwargs)

    PlainNorm.__name__ = PlainNorm.__qualname__ = f"Plain{norm.__name__}"
    return PlainNorm


def gdn_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """``G``: pre-norm + megatron-core's Gated DeltaNet (our subclass: CPU/packed without fla)."""
    fused = backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else backend.layer_norm(rms_norm=True),
            self_attention=ModuleSpec(
                module=GatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=(
                        backend.column_parallel_layer_norm_linear()
                        if fused
                        else backend.column_parallel_linear()
                    ),
                    out_norm=plain_norm(backend.layer_norm(rms_norm=True)),
                    out_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=_fused_norm_keys("in_proj") if fused else {},
        ),
    )


def _moe_layer(backend: BackendSpecProvider, num_experts: int, grouped_gemm: bool) -> ModuleSpec:
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=backend.layer_norm(rms_norm=True),
            mlp=get_moe_module_spec_for_backend(
                backend=backend, num_experts=num_experts, moe_grouped_gemm=grouped_gemm
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def hybrid_stack_spec(
    backend: BackendSpecProvider,
    *,
    num_experts: int,
    moe_grouped_gemm: bool = False,
    gdn_layer: ModuleSpec | None = None,
) -> ModuleSpec:
    """The ``HybridStack`` spec: gated attention ``*``, MoE ``E`` and Gated DeltaNet ``G``
    (``gdn_layer`` overrides the provider's GDN layer spec)."""
    submodules = HybridStackSubmodules(
        attention_layer=_attention_layer(backend),
        moe_layer=_moe_layer(backend, num_experts, moe_grouped_gemm),
        gdn_layer=gdn_layer if gdn_layer is not None else gdn_layer_spec(backend),
    )
    return ModuleSpec(
        module=A1HybridStack,
        params={"final_norm": backend.layer_norm(rms_norm=True)},
        submodules=submodules,
    )
