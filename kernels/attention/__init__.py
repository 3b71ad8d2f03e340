"""Packed-sequence (varlen) attention: Triton FlashAttention-2 style kernels.

``packed_attention`` takes THD packs (``cu_seqlens``), ``batched_attention`` ordinary bshd/sbhd
batches through the same kernels; ``packed_attention_reference`` is the per-document
``scaled_dot_product_attention`` oracle.
"""
from .ops import batched_attention, packed_attention
from .reference import packed_attention_reference

__all__ = ["packed_attention", "batched_attention", "packed_attention_reference"]
