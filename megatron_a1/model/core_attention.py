"""Core attention for megatron-core layers that takes packed (THD) sequences without Transformer
Engine: the drop-in ``core_attention`` of a ``SelfAttentionSubmodules`` spec.

    SelfAttentionSubmodules(linear_qkv=..., core_attention=PackedDotProductAttention, ...)

Constructor and ``forward`` follow megatron-core 0.19.2's ``DotProductAttention``; the maths runs
in the Triton kernels of ``a1_kernels.attention``, so no [s, s] score matrix or mask is ever built
and documents of a pack never see each other. Where Triton cannot run (CPU tensors without
``TRITON_INTERPRET=1``: CPU training and the demo) the same contract is served by the kernels'
PyTorch reference, ``scaled_dot_product_attention`` per document.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from a1_kernels.attention import batched_attention, packed_attention, packed_attention_reference

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_FULL = (AttnMaskType.no_mask, AttnMaskType.padding)


class PackedDotProductAttention(MegatronModule):
    """megatron-core core attention on the packed-attention kernels.

    Supports what the Qwen3.5 full-attention layers need: causal (or full) self-attention, GQA
    (``config.num_query_groups``), THD packs through ``packed_seq_params`` and ordinary
    ``[s, b, h, d]`` batches, megatron's softmax scale rules. Not supported (rejected at
    construction or in ``forward``): attention dropout, context parallelism, sliding windows,
    learnable/off-by-one softmax, attention bias, arbitrary mask tensors.

    Args:
        config: the layer's ``TransformerConfig``.
        layer_number: 1-based; with ``apply_query_key_layer_scaling`` megatron divides the
            scale by it and multiplies the scores back inside its softmax, so the effective
            scale is unchanged: the kernel uses ``softmax_scale * layer_number``.
        attn_mask_type: ``causal``/``padding_causal`` -> causal, ``no_mask``/``padding`` -> full.
        attention_type: ``"self"`` (kept for the signature; cross attention is not supported).
        attention_dropout: must be 0 (default: ``config.attention_dropout``).
        softmax_scale: default ``1 / sqrt(kv_channels)``.
        cp_comm_type: unused (context parallelism is not supported).
        pg_collection: process groups; only ``tp`` is used (heads per partition).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        if config.context_parallel_size != 1:
            raise NotImplementedError("PackedDotProductAttention: context parallelism is not "
                                      "supported; use the Transformer Engine backend")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"PackedDotProductAttention has no attention dropout (got {dropout});"
                             " set attention_dropout=0.0")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type!r} is not supported")
        if config.window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported")
        if attention_type != "self":
            raise NotImplementedError(f"attention_type={attention_type!r}: only 'self'")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)

        # Same attribute as megatron's (divided by the layer number under query-key layer
        # scaling); the kernel applies the product of both factors, i.e. the undivided scale.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self._kernel_scale = self.softmax_scale
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention of one layer.

        Args:
            query: [sq, b, np, hn], or [t, np, hn] / [t, 1, np, hn] when
                ``packed_seq_params.qkv_format == "thd"`` (megatron squeezes the batch dim).
            key, value: [sq, b, ng, hn] / [t, ng, hn] / [t, 1, ng, hn]; np a multiple of ng.
            attention_mask: ignored for causal/no-mask types (the kernels apply causality
                themselves); a mask tensor with any other type is rejected.
            attn_mask_type: overrides the constructor's type for this call.
            attention_bias: must be None.
            packed_seq_params: THD packs: ``cu_seqlens_q`` (== ``cu_seqlens_kv``), optional
                ``cu_seqlens_q_padded`` (padding between documents becomes its own segments,
                never attended to by a real token), ``max_seqlen_q``.

        Returns:
            [sq, b, np * hn] (THD: [t, 1, np * hn]), in the input dtype.
        """
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type in _CAUSAL:
            causal = True
        elif mask_type in _FULL:
            causal = False
        else:
            raise NotImplementedError(f"attn_mask_type={mask_type} is not supported")
        if attention_mask is not None and mask_type not in (AttnMaskType.causal,
                                                            AttnMaskType.no_mask):
            raise NotImplementedError(f"an attention_mask tensor with {mask_type} cannot be "
                                      "applied; pass packed_seq_params for padded packs")
        scale = self._kernel_scale

        triton_ok = query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            q, k, v = (x.squeeze(1) if x.dim() == 4 else x for x in (query, key, value))
            cu, max_seqlen = _thd_segments(packed_seq_params, q.shape[0])
            if triton_ok:
                out = packed_attention(q, k, v, cu, max_seqlen, causal=causal,
                                       softmax_scale=scale)
            else:
                out = packed_attention_reference(q, k, v, cu, causal=causal, softmax_scale=scale)
            return out.reshape(out.shape[0], 1, -1)
        if packed_seq_params is not None and packed_seq_params.qkv_format not in (None, "sbhd"):
            raise NotImplementedError(f"qkv_format={packed_seq_params.qkv_format!r}")
        if triton_ok:
            out = batched_attention(query, key, value, causal=causal, softmax_scale=scale,
                                    layout="sbhd")
        else:  # [s, b, h, d] -> b documents of length s, back to back
            s_len, b = query.shape[:2]
            q, k, v = (x.transpose(0, 1).reshape(b * s_len, *x.shape[2:])
                       for x in (query, key, value))
            cu = torch.arange(0, (b + 1) * s_len, s_len, dtype=torch.int32)
            out = packed_attention_reference(q, k, v, cu, causal=causal, softmax_scale=scale)
            out = out.view(b, s_len, *out.shape[1:]).transpose(0, 1)
        return out.reshape(out.shape[0], out.shape[1], -1)


def _thd_segments(params: PackedSeqParams, n_tokens: int) -> tuple[Tensor, int]:
    """cu_seqlens for the kernel and a max_seqlen bound, from megatron's packed params."""
    cu = params.cu_seqlens_q
    if params.cu_seqlens_kv is not None and params.cu_seqlens_kv is not cu:
        if params.cu_seqlens_kv.shape != cu.shape or (
            cu.device.type == "cpu" and not torch.equal(params.cu_seqlens_kv, cu)):
            raise ValueError("self-attention packs need cu_seqlens_q == cu_seqlens_kv")
    padded = params.cu_seqlens_q_padded
    if padded is not None and padded is not cu:
        # Document i is padded[i] .. padded[i] + len_i; the padding after it becomes a segment
        # of its own: boundaries [p0, p0 + l0, p1, p1 + l1, ...].
        starts = padded[:-1].to(torch.int32)
        ends = starts + (cu[1:] - cu[:-1]).to(torch.int32)
        cu = torch.stack([starts, ends], dim=1).flatten()
        cu = torch.cat([cu, padded[-1:].to(torch.int32)])
    max_seqlen = params.max_seqlen_q or n_tokens
    return cu, int(max_seqlen if padded is None else n_tokens)
