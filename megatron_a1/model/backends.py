"""The one place that decides which implementation each layer uses.

megatron-core's ``BackendSpecProvider`` protocol names the pieces a layer spec needs (linears,
norms, core attention, grouped experts). Layers ask the provider; they never branch on what is
installed. Two providers:

* ``TESpecProvider`` (megatron-core's own) when Transformer Engine is importable and CUDA is
  present: fused norms + linears, grouped-GEMM experts, TE attention.
* :class:`A1LocalSpecProvider` otherwise (CPU, or a GPU image without TE): megatron-core's local
  linears and experts, our :class:`~megatron_a1.model.norms.RMSNorm` (zero-centred gamma and
  sequence parallelism, which the upstream local norm rejects) and our packed core attention
  when it is available.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

from megatron_a1.model.norms import RMSNorm


class A1LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local backend with the norms and attention this model needs."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm

    def core_attention(self) -> type:
        from megatron_a1.model.core_attention import PackedDotProductAttention

        return PackedDotProductAttention


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@lru_cache(maxsize=None)
def get_backend(name: str = "auto") -> BackendSpecProvider:
    """``"auto"`` (TE when usable, else local), ``"te"`` or ``"local"``."""
    if name == "auto":
        name = "te" if transformer_engine_available() else "local"
    if name == "te":
        if not transformer_engine_available():
            raise RuntimeError(
                "backend 'te' needs Transformer Engine and a CUDA device; use backend 'local' "
                "(or 'auto') on this machine"
            )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if name == "local":
        return A1LocalSpecProvider()
    raise ValueError(f"unknown backend {name!r}: expected 'auto', 'te' or 'local'")
