"""Launchers, the autograd Function and the public entry points of packed attention.

    packed_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)   # THD packs (varlen)
    batched_attention(q, k, v, causal=True, layout="bshd"|"sbhd")    # ordinary batches

Both go through the same two ``torch.library`` custom ops (``a1_kernels::attention_fwd`` /
``a1_kernels::attention_bwd``, with fake implementations, so ``torch.compile`` traces them) and
the same three Triton kernels in ``kernels.py``: forward (saves the log-sum-exp), dQ (also
computes ``delta = rowsum(dO * O)``), then dK/dV (summed over the query heads of each KV head).
On a GPU each kernel is autotuned over ``CONFIGS`` for its head dim and dtype; under
``TRITON_INTERPRET=1`` one fixed config (``INTERPRET_TILES``) is launched.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .kernels import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_fwd_kernel

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def text(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


_C = TileConfig
# Candidate tiles per kernel, head dim (64 covers 16/32/64) and element width in bytes.
# Chosen so that every one compiles for sm_80 and sm_90 within shared memory and (head dim <= 128,
# and bf16/fp16 at 256) without register spills: tests/test_attention_compile.py checks both. The
# fp32 (tf32x3) tiles at head dim 256 still spill; tools/kernel_report.py shows by how much.
CONFIGS: dict[str, dict[tuple[int, int], list[TileConfig]]] = {
    "fwd": {
        # d64: (128, 64, 4, 3) and (128, 128, 8, 3) spill 16 B on sm_80 (Triton 3.7.1).
        (64, 2): [_C(128, 64, 8, 3), _C(128, 32, 4, 3), _C(64, 64, 4, 3)],
        (128, 2): [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
        # d256: (64, 32, 4, 2) and (128, 32, 8, 2) spill 48-192 B on sm_80 (Triton 3.7.1).
        (256, 2): [_C(64, 64, 8, 2), _C(64, 32, 8, 2)],
        # fp32: (64, 32, 4, 2) at d64 and (32, 32, 4, 2) at d128 spill 40-88 B on sm_80/sm_100.
        (64, 4): [_C(16, 32, 4, 2)],
        (128, 4): [_C(16, 32, 4, 2)],
        (256, 4): [_C(32, 16, 4, 1)],
    },
    "bwd_dq": {
        (64, 2): [_C(64, 64, 4, 3), _C(128, 64, 8, 3)],
        # d128: (128, 64, 8, 2) spills 80 B on sm_80 (Triton 3.7.1).
        (128, 2): [_C(64, 64, 4, 3), _C(128, 32, 8, 2)],
        (256, 2): [_C(64, 32, 8, 2), _C(32, 32, 4, 2)],
        (64, 4): [_C(32, 32, 4, 2)],
        (128, 4): [_C(16, 32, 4, 1)],
        (256, 4): [_C(32, 16, 4, 1)],
    },
    "bwd_dkdv": {
        (64, 2): [_C(32, 64, 8, 2)],
        (128, 2): [_C(32, 64, 8, 1), _C(16, 32, 4, 2)],
        # d256: (32, 32, 8, 2) and (16, 32, 4, 2) spill 40-240 B (Triton 3.7.1, sm_80/sm_90).
        (256, 2): [_C(16, 32, 8, 2), _C(32, 16, 8, 2)],
        (64, 4): [_C(16, 32, 4, 1)],
        (128, 4): [_C(16, 16, 4, 1)],
        (256, 4): [_C(16, 16, 4, 1)],
    },
}
KERNELS = {"fwd": attn_fwd_kernel, "bwd_dq": attn_bwd_dq_kernel, "bwd_dkdv": attn_bwd_dkdv_kernel}
# Interpreter tiles (block_m, block_n): small, so that short test documents span several tiles.
INTERPRET_TILES = (16, 16)
AUTOTUNE_KEY = ["n_tokens", "group", "causal"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs_for(kernel: str, head_dim: int, dtype: torch.dtype) -> list[TileConfig]:
    """The tile configs the autotuner may pick for ``kernel`` at this head dim and dtype."""
    width = 4 if dtype == torch.float32 else 2
    return CONFIGS[kernel][(max(head_dim, 64), width)]


_tuned: dict[tuple[str, int, torch.dtype], object] = {}


def _launch(kernel: str, grid_rows: int, grid_heads: int, args: tuple, head_dim: int,
            dtype: torch.dtype, n_docs: int) -> None:
    """Launch ``kernel`` over ``grid_rows // BLOCK + n_docs`` row tiles and ``grid_heads`` heads."""
    block_key = "BLOCK_N" if kernel == "bwd_dkdv" else "BLOCK_M"
    consts = dict(HEAD_DIM=head_dim, FP32_DOT=dtype == torch.float32)
    if _interpreting():
        consts["FP32_DOT"] = dtype in (torch.float32, torch.bfloat16)  # see kernels._dot
        bm, bn = INTERPRET_TILES
        block = bn if kernel == "bwd_dkdv" else bm
        KERNELS[kernel][(grid_rows // block + n_docs, grid_heads)](
            *args, BLOCK_M=bm, BLOCK_N=bn, **consts, num_warps=4, num_stages=1)
        return
    key = (kernel, head_dim, dtype)
    if key not in _tuned:
        _tuned[key] = triton.autotune(
            configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                                   num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in configs_for(kernel, head_dim, dtype)],
            key=AUTOTUNE_KEY,
        )(KERNELS[kernel])
    grid = lambda meta: (grid_rows // meta[block_key] + n_docs, grid_heads)  # noqa: E731
    _tuned[key][grid](*args, **consts)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_t, stride_h) of a [T, H, D] or [B, S, H, D] tensor."""
    return (0, x.stride(0), x.stride(1)) if x.dim() == 3 else (x.stride(0), x.stride(1), x.stride(2))


def _rows(x: Tensor) -> int:
    return x.shape[0] if x.dim() == 3 else x.shape[0] * x.shape[1]


def _lastdim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("a1_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool,
                   softmax_scale: float, seq_first: bool) -> tuple[Tensor, Tensor]:
    """q [T, Hq, D] or [B, S, Hq, D] (k, v with Hkv heads) -> (out like q, lse [Hq, T] fp32)."""
    out, lse = _fwd_alloc(q, seq_first, zeros=True)
    n_docs = cu_seqlens.numel() - 1
    if n_docs > 0 and _rows(q) > 0:
        hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        args = (q, k, v, out, lse, cu_seqlens, *_strides(q), *_strides(k), *_strides(v),
                *_strides(out), n_docs, _rows(q), int(q.dim() == 3), hq // hk, int(causal),
                softmax_scale * math.log2(math.e))
        _launch("fwd", _rows(q), hq, args, d, q.dtype, n_docs)
    return out, lse


def _fwd_alloc(q: Tensor, seq_first: bool, zeros: bool) -> tuple[Tensor, Tensor]:
    new = torch.zeros if zeros else torch.empty
    if q.dim() == 4 and seq_first:  # [B, S, H, D] view of an [S, B, H, D] tensor
        b, s, h, d = q.shape
        out = new((s, b, h, d), dtype=q.dtype, device=q.device).transpose(0, 1)
    else:
        out = new(q.shape, dtype=q.dtype, device=q.device)
    lse = new((q.shape[-2], _rows(q)), dtype=torch.float32, device=q.device)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, causal, softmax_scale, seq_first):
    return _fwd_alloc(q, seq_first, zeros=False)


@torch.library.custom_op("a1_kernels::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens: Tensor, causal: bool,
                   softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), shaped like (q, k, v); rows outside every document get zero."""
    do = _lastdim_contiguous(do)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n_docs = cu_seqlens.numel() - 1
    if n_docs > 0 and _rows(q) > 0:
        hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        delta = torch.empty_like(lse)
        common = (n_docs, _rows(q), int(q.dim() == 3), hq // hk, int(causal),
                  softmax_scale * math.log2(math.e), softmax_scale)
        _launch("bwd_dq", _rows(q), hq,
                (q, k, v, out, do, dq, lse, delta, cu_seqlens, *_strides(q), *_strides(k),
                 *_strides(v), *_strides(out), *_strides(do), *_strides(dq), *common),
                d, q.dtype, n_docs)
        _launch("bwd_dkdv", _rows(q), hk,
                (q, k, v, do, dk, dv, lse, delta, cu_seqlens, *_strides(q), *_strides(k),
                 *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *common),
                d, q.dtype, n_docs)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class PackedAttentionFunction(torch.autograd.Function):
    """Autograd over the two custom ops; saves q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, softmax_scale, seq_first):
        out, lse = torch.ops.a1_kernels.attention_fwd(q, k, v, cu_seqlens, causal, softmax_scale,
                                                      seq_first)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.a1_kernels.attention_bwd(do, q, k, v, out, lse, cu_seqlens,
                                                        ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dims: int) -> None:
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ValueError(f"q, k, v must be {dims}-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or head dim")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of KV heads ({k.shape[-2]})")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported; use one of {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
                     causal: bool = True, softmax_scale: float | None = None) -> Tensor:
    """Attention over documents packed back to back (THD), never across a document boundary.

    Args:
        q: [T, Hq, D] queries of all documents; D in 16/32/64/128/256; fp16, bf16 or fp32.
        k, v: [T, Hkv, D], same dtype; Hq must be a multiple of Hkv (GQA: query head ``h``
            reads KV head ``h // (Hq // Hkv)``).
        cu_seqlens: [N + 1] int32 (int64 is converted), cumulative document lengths:
            ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[N] <= T``. Documents may have
            length 0 or 1; rows past ``cu_seqlens[N]`` get zero output and zero gradient.
        max_seqlen: longest document (flash-attn's convention; the kernels do not need it, and
            it is checked against ``cu_seqlens`` only when that tensor is on the CPU).
        causal: row ``i`` of a document sees keys ``0..i`` of the same document (top-left
            alignment; q and k have the same lengths); otherwise the whole document.
        softmax_scale: defaults to ``1 / sqrt(D)``.

    Returns:
        [T, Hq, D] in q's dtype. Differentiable in q, k and v.

    Example:
        >>> cu = torch.tensor([0, 3, 8], dtype=torch.int32)        # two documents: 3 + 5 tokens
        >>> out = packed_attention(q, k, v, cu, max_seqlen=5)        # q [8, Hq, D], k/v [8, Hkv, D]
    """
    _check_qkv(q, k, v, 3)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens on {cu_seqlens.device}, q on {q.device}")
    cu_seqlens = cu_seqlens.to(torch.int32)
    if cu_seqlens.device.type == "cpu":  # value checks cost a device sync elsewhere
        lens = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or bool((lens < 0).any()) or int(cu_seqlens[-1]) > q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0, not decrease and end <= {q.shape[0]}")
        if lens.numel() and int(lens.max()) > max_seqlen:
            raise ValueError(f"a document of {int(lens.max())} tokens exceeds max_seqlen={max_seqlen}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    return PackedAttentionFunction.apply(q, k, v, cu_seqlens, bool(causal), scale, False)


def batched_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                      softmax_scale: float | None = None, layout: str = "bshd") -> Tensor:
    """Attention over an ordinary batch of equal-length sequences, through the packed kernels.

    Args:
        q: [B, S, Hq, D] (``layout="bshd"``) or [S, B, Hq, D] (``layout="sbhd"``, megatron's).
        k, v: [B, S, Hkv, D] or [S, B, Hkv, D]; GQA, dtypes and head dims as in
            ``packed_attention``.
        causal: each row sees keys up to its own position in its own sequence.
        softmax_scale: defaults to ``1 / sqrt(D)``.

    Returns:
        Same layout and shape as q (contiguous in that layout). No copies of q, k, v are made:
        the kernels read both layouts through strides.
    """
    if layout not in ("bshd", "sbhd"):
        raise ValueError(f"layout must be 'bshd' or 'sbhd', got {layout!r}")
    _check_qkv(q, k, v, 4)
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    if layout == "sbhd":
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    b, s = q.shape[:2]
    cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=q.device) * s
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out = PackedAttentionFunction.apply(q, k, v, cu_seqlens, bool(causal), scale, layout == "sbhd")
    return out.transpose(0, 1) if layout == "sbhd" else out
