"""megatron-core's ``GatedDeltaNet``, runnable without flash-linear-attention's GPU kernels.

megatron-core 0.19.2 (``megatron/core/ssm/gated_delta_net/``) takes three functions from
``fla`` at import time, and sets them to None when ``fla`` is not installed:

* ``causal_conv1d`` - called by name in ``GatedDeltaNet.forward`` (the conv on q/k/v);
* ``l2norm`` - called by name in ``_GDNBase._prepare_input_for_gated_delta_rule``;
* ``chunk_gated_delta_rule`` - stored as ``self.gated_delta_rule`` by ``_setup_variant_attrs``.

Without ``fla``, ``_GDNBase.__init__`` raises ``ImportError`` at its first line (``HAVE_FLA``
guard), and even past it ``_setup_variant_attrs`` would leave ``gated_delta_rule = None``,
which ``__init__`` asserts against. With ``fla`` installed but no GPU, the module builds and its
forward fails inside fla's Triton kernels ("0 active drivers"). megatron-core's own PyTorch
fallback (``deterministic_mode``) asserts ``cu_seqlens is None`` and its conv reads across
document boundaries, so it cannot take packed batches.

:class:`GatedDeltaNet` here subclasses upstream's and changes only which functions run:

* when ``fla`` is importable and the input is on a CUDA device, every method is upstream's,
  unchanged (the fla/GPU path);
* otherwise upstream's own ``__init__``, ``forward`` and ``_prepare_input_for_gated_delta_rule``
  run with those three names bound to :mod:`megatron_a1.model.gated_delta_rule` (exact on
  packed THD input, any device). The binding is done on private copies of the functions
  (:func:`_rebind`): megatron-core's modules and classes are left untouched, and no upstream
  code is duplicated here.

The PyTorch path does not cover (and raises ``NotImplementedError`` for) context parallelism
(``cp_size > 1``) and inference (``inference_context``; upstream does not support it either).
Tensor/sequence parallelism only changes the linears around the ops and needs nothing from
them. megatron-core's CUDA-only calls at construction (``torch.cuda.current_device()`` for
parameter devices, CUDA RNG tracker) are the CPU compatibility layer's business
(:mod:`megatron_a1.runtime`).

Use it in a layer spec in place of upstream's class::

    ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=RMSNorm, out_proj=RowParallelLinear))
"""
from __future__ import annotations

import types

import torch
from megatron.core.ssm.gated_delta_net import common as _upstream_common
from megatron.core.ssm.gated_delta_net import gdn as _upstream_gdn

from megatron_a1.model import gated_delta_rule as torch_ops

__all__ = ["GatedDeltaNet", "fla_usable"]

HAVE_FLA: bool = _upstream_common.HAVE_FLA


def fla_usable(x: torch.Tensor) -> bool:
    """True when upstream's fla kernels can run on ``x``: fla is installed and ``x`` is on CUDA."""
    return HAVE_FLA and x.is_cuda


def _rebind(fn, **names):
    """A copy of function ``fn`` that sees ``names`` instead of its module's globals of the same
    names. Nothing else changes (code, defaults, closure - so zero-argument ``super()`` works)."""
    missing = set(names) - set(fn.__code__.co_names)
    if missing:  # upstream changed: the names we rebind are no longer looked up by this function
        raise RuntimeError(f"{fn.__qualname__} no longer refers to {sorted(missing)}")
    copy = types.FunctionType(
        fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


def _chunk_gated_delta_rule(q, k, v, g, beta, *args, **kwargs):
    """fla's kernel on CUDA tensors when fla is installed, else the PyTorch one."""
    if fla_usable(q):
        return _upstream_common.chunk_gated_delta_rule(q, k, v, g, beta, *args, **kwargs)
    return torch_ops.chunk_gated_delta_rule(q, k, v, g, beta, *args, **kwargs)


# Upstream's functions, with fla's names bound to ours. ``_prepare_input_for_gated_delta_rule``
# is wrapped by megatron-core's ``jit_fuser`` (torch.compile); the copy is of the plain function.
_upstream_prepare = _upstream_common._GDNBase._prepare_input_for_gated_delta_rule
_init_without_fla = _rebind(_upstream_common._GDNBase.__init__, HAVE_FLA=True)
_torch_forward = _rebind(_upstream_gdn.GatedDeltaNet.forward, causal_conv1d=torch_ops.causal_conv1d)
_torch_prepare = _rebind(
    getattr(_upstream_prepare, "__wrapped__", _upstream_prepare), l2norm=torch_ops.l2norm
)


class GatedDeltaNet(_upstream_gdn.GatedDeltaNet):
    """Upstream ``GatedDeltaNet``; runs on CPU (and without fla) through PyTorch ops.

    Same constructor, parameters, checkpoint keys and forward signature as upstream's. Packed
    batches arrive as upstream expects them: ``hidden_states`` ``[T, 1, hidden]`` and
    ``packed_seq_params`` with ``qkv_format="thd"`` and ``cu_seqlens_q`` (== ``cu_seqlens_kv``).
    """

    def __init__(self, *args, **kwargs):
        if HAVE_FLA:
            super().__init__(*args, **kwargs)
        else:
            _init_without_fla(self, *args, **kwargs)

    def _setup_variant_attrs(self):
        super()._setup_variant_attrs()
        if not self.config.deterministic_mode:
            # upstream stores fla's kernel (None without fla); dispatch per call instead
            self.gated_delta_rule = _chunk_gated_delta_rule

    def forward(self, hidden_states, attention_mask, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None,
                **kwargs):
        """Upstream's forward; see :class:`megatron.core.ssm.gated_delta_net.GatedDeltaNet`."""
        args = (hidden_states, attention_mask, inference_context, packed_seq_params,
                sequence_len_offset)
        if fla_usable(hidden_states):
            return super().forward(*args, inference_params=inference_params, **kwargs)
        if self.cp_size > 1:
            raise NotImplementedError(
                "GatedDeltaNet without fla/CUDA (the PyTorch path) does not support context "
                f"parallelism (cp_size={self.cp_size}); use context_parallel=1 or a GPU with fla"
            )
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("GatedDeltaNet does not support inference (upstream neither)")
        return _torch_forward(self, *args, **kwargs)

    def _prepare_input_for_gated_delta_rule(self, qkv, gate, batch, seq_len, *gate_feats):
        if fla_usable(qkv):
            return super()._prepare_input_for_gated_delta_rule(qkv, gate, batch, seq_len, *gate_feats)
        return _torch_prepare(self, qkv, gate, batch, seq_len, *gate_feats)
