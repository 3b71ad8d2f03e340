"""Launchers, the autograd Function and the public entry points of packed attention.

    packed_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)   # THD packs (varlen)
    batched_attention(q, k, v, causal=True, layout="bshd"|"sbhd")    # ordinary batches

Both go through the same two ``torch.library`` custom ops (``a1_kernels::attention_fwd`` /
``a1_kernels::attention_bwd``, with fake implementations, so ``torch.compile`` traces them) and
the Triton kernels in ``kernels.py``: the forward (saves the log-sum-exp), then one of two
backwards:

* ``deterministic=True`` (the default; 7 matmuls): a dQ kernel (also writing ``delta``) that
  recomputes the scores and dP per query tile, then a dK/dV kernel per key tile;
* ``deterministic=False`` (5 matmuls, FlashAttention-2's): ``delta = rowsum(dO * O)``, then one
  kernel per key tile computing dK, dV and adding its share of dQ into an fp32 buffer with
  atomics (the order of the additions varies from run to run: dQ is not bitwise reproducible).
  Fewer FLOPs, but with Triton 3.7.1 its sm_90 tiles spill at head dims 128/256
  (BENCHMARKS.md), so it is opt-in until a GPU measures it.

On a GPU each kernel is autotuned over ``CONFIGS`` for its head dim and dtype (``HOPPER_CONFIGS``
on sm_90+, ``TMA_CONFIGS`` when its operands go through TMA descriptors: bf16/fp16 on sm_90+ with
TMA-addressable tensors, see :func:`use_tma`); under ``TRITON_INTERPRET=1`` one fixed config
(``INTERPRET_TILES``) is launched.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from . import kernels
from .kernels import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_fwd_kernel

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # dK/dV kernels: head-dim columns per program (0: all). At head dim 256 two programs share a
    # key tile, each accumulating half of dK/dV (and dQ), so the accumulators fit in registers.
    d_split: int = 0
    # dK/dV kernels: software-pipeline stages of the short masked loops (0: num_stages).
    masked_stages: int = 0

    def text(self) -> str:
        split = f"-D{self.d_split}" if self.d_split else ""
        masked = f"-m{self.masked_stages}" if self.masked_stages else ""
        tile = f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"
        return tile + split + masked


_C = TileConfig
# Candidate tiles per kernel, head dim (64 covers 16/32/64) and element width in bytes.
# Chosen so that every one compiles for sm_80 and sm_90 within shared memory and (head dim <= 128,
# and bf16/fp16 at 256) without register spills: tests/test_attention_compile.py checks both. The
# fp32 (tf32x3) tiles at head dim 256 still spill; tools/kernel_report.py shows by how much.
CONFIGS: dict[str, dict[tuple[int, int], list[TileConfig]]] = {
    "fwd": {
        # d64: (128, 64, 4, 3) and (128, 128, 8, 3) spill 16 B on sm_80 (Triton 3.7.1).
        (64, 2): [_C(128, 64, 8, 3), _C(128, 32, 4, 3), _C(64, 64, 4, 3)],
        # d128: (64, 64, 4, 3) spills 8 B on sm_80 (Triton 3.7.1).
        (128, 2): [_C(128, 64, 8, 3), _C(128, 32, 8, 3)],
        # d256: (64, 64, 8, 2), (64, 32, 4, 2) and (128, 32, 8, 2) spill 8-256 B on sm_80.
        (256, 2): [_C(64, 32, 8, 2)],
        # fp32: (64, 32, 4, 2) at d64 and (32, 32, 4, 2) at d128 spill 40-88 B on sm_80/sm_100,
        # (16, 32, 4, 2) at d64 8 B on sm_90.
        (64, 4): [_C(32, 32, 8, 2)],
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
    # dK/dV: key tiles of 64+ rows (the M of its four matmuls) so that sm_90 uses wgmma, two
    # stages so that the query-side loads are cp.async. Wider tiles spill on sm_90 with Triton
    # 3.7.1 (BENCHMARKS.md, "Attention kernels on Hopper").
    "bwd_dkdv": {
        (64, 2): [_C(32, 128, 8, 2, 0, 1), _C(32, 64, 4, 2, 0, 1)],
        (128, 2): [_C(16, 64, 8, 2)],
        (256, 2): [_C(16, 32, 8, 2), _C(32, 16, 8, 2)],  # sm_80: mma.sync, no split
        (64, 4): [_C(16, 32, 4, 1)],
        (128, 4): [_C(32, 16, 8, 1)],  # (16, 16, 4, 1) spills 24 B
        (256, 4): [_C(16, 16, 4, 1, 128)],
    },
    # dK/dV + atomic dQ (deterministic=False). At head dims 128/256 every bf16 tile compiled for
    # sm_90 spills (BENCHMARKS.md); these spill least.
    "bwd": {
        (64, 2): [_C(64, 64, 8, 2, 0, 1)],
        (128, 2): [_C(16, 64, 8, 2, 0, 1), _C(64, 64, 8, 2, 0, 1)],
        (256, 2): [_C(16, 128, 8, 2, 128, 1), _C(16, 64, 8, 2, 128, 1)],
        (64, 4): [_C(16, 32, 4, 1)],
        (128, 4): [_C(16, 16, 4, 1)],
        (256, 4): [_C(16, 16, 4, 1, 128)],
    },
    # rowsum(dO * O): no matmul, memory bound; one config.
    "bwd_delta": {(d, w): [_C(64, 0, 4, 1)] for d in (64, 128, 256) for w in (2, 4)},
}
# sm_90+ replacements (where a tile that suits wgmma spills on sm_80 or one that suits sm_80
# misses wgmma): per kernel, (head dim, element bytes) -> tiles.
HOPPER_CONFIGS: dict[str, dict[tuple[int, int], list[TileConfig]]] = {
    # d256: (128, 32, 8, 2) gives each warpgroup its own 64 rows, (64, 64, 8, 2) splits each
    # row's softmax over two warpgroups but issues fewer instructions per FLOP; the autotuner
    # decides. Both spill on sm_80 (8-256 B). Spilling on sm_90 (the model's launch, Triton
    # 3.7.1): d128 (128, 128, 8, 2|3) 32 B; d256 (128, 64, 8, 2|3) 8 B, (64, 32, 4, 2|3) 16 B,
    # (64, 64, 4, 2) 104 B.
    "fwd": {(256, 2): [_C(64, 64, 8, 2), _C(128, 32, 8, 2)]},
    # (32, 32, 4, 2) is mma.sync only on sm_90.
    "bwd_dq": {(256, 2): [_C(64, 32, 8, 2)]},
    # Two programs per key tile, each owning half of dK/dV (spills 40 B on sm_80).
    "bwd_dkdv": {(256, 2): [_C(16, 128, 8, 2, 128)]},
}
# sm_90+, bf16/fp16, with the query-side tiles and main-loop operands loaded by TMA (ragged
# descriptors, ``use_tma``): no address arithmetic in the loop, which is what lets the wide tiles
# fit without spills (sm_90, Triton 3.7.1: fwd d128 M128 N128 196 registers, 32 B of spills with
# pointers). Kernels and head dims missing here keep pointers on every GPU: the dK/dV kernel at
# d256 spills 144-544 B with TMA (0 with cp.async), the atomic-dQ backward spills either way
# (BENCHMARKS.md, "Attention kernels on Hopper").
TMA_CONFIGS: dict[str, dict[tuple[int, int], list[TileConfig]]] = {
    "fwd": {
        (64, 2): [_C(128, 128, 8, 3), _C(128, 64, 8, 3)],
        (128, 2): [_C(128, 128, 8, 2), _C(128, 64, 8, 3)],
        # M128 on 8 warps: each warpgroup owns 64 rows and their softmax.
        (256, 2): [_C(128, 64, 8, 2), _C(64, 64, 8, 2)],
    },
    "bwd_dq": {
        (64, 2): [_C(128, 128, 8, 2), _C(64, 64, 4, 3)],
        (128, 2): [_C(128, 128, 8, 2), _C(128, 64, 8, 2)],
        (256, 2): [_C(128, 32, 8, 2), _C(64, 64, 8, 2)],
    },
    "bwd_dkdv": {
        (64, 2): [_C(64, 64, 4, 2, 0, 1), _C(32, 128, 8, 2, 0, 1)],
        # M16 N64 with TMA: 1.53 main-loop instructions per kFLOP vs 1.11 with cp.async.
        (128, 2): [_C(32, 64, 8, 2)],
    },
}
KERNELS = {"fwd": attn_fwd_kernel, "bwd_dq": attn_bwd_dq_kernel, "bwd_dkdv": attn_bwd_dkdv_kernel,
           "bwd": attn_bwd_dkdv_kernel, "bwd_delta": attn_bwd_delta_kernel}
# Kernels whose programs cover key tiles (BLOCK_N) and may split the head dim (D_SPLIT).
_KEY_TILED = ("bwd_dkdv", "bwd")
# The tensors each kernel loads through TMA when ``use_tma``: its query-side tiles and the
# operands its main loop streams.
TMA_OPERANDS = {"fwd": ("Q", "K", "V"), "bwd_dq": ("Q", "K", "V", "O", "DO"),
                "bwd_dkdv": ("Q", "DO")}
# Interpreter tiles (block_m, block_n): small, so that short test documents span several tiles.
INTERPRET_TILES = (16, 16)
AUTOTUNE_KEY = ["n_tokens", "group", "causal"]
# "auto": TMA on sm_90+ for bf16/fp16 when the tensors allow it (never under the interpreter);
# "1": also under the interpreter (what the tests use to run that path on CPU); "0": never.
TMA_ENV = "A1_ATTENTION_TMA"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs_for(kernel: str, head_dim: int, dtype: torch.dtype, arch: int = 80,
                tma: bool = False) -> list[TileConfig]:
    """The tile configs the autotuner may pick for ``kernel`` at this head dim and dtype on
    ``sm_<arch>``, with the main-loop operands loaded by TMA or not."""
    key = _config_key(head_dim, dtype)
    if tma and arch >= 90 and has_tma_tiles(kernel, head_dim, dtype):
        return TMA_CONFIGS[kernel][key]
    if arch >= 90 and key in HOPPER_CONFIGS.get(kernel, {}):
        return HOPPER_CONFIGS[kernel][key]
    return CONFIGS[kernel][key]


def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def interpret_split(head_dim: int) -> int:
    """D_SPLIT under the interpreter: head dim 256 takes the split path, as on a GPU."""
    return 128 if head_dim > 128 else head_dim


def tma_view(x: Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of ``x`` ([T, H, D] or [B, S, H, D]) seen as a TMA-addressable
    [rows, H * D] matrix whose row ``cu_seqlens[i] + r`` is document ``i``'s row ``r``; None when
    it is not one (heads not adjacent, batches not back to back, or not 16-byte aligned)."""
    heads, d = x.shape[-2:]
    stride_b, row_stride, stride_h = _strides(x)
    if x.stride(-1) != 1 or (heads > 1 and stride_h != d):
        return None
    if x.dim() == 4 and x.shape[0] > 1 and stride_b != x.shape[1] * row_stride:
        return None
    rows = _rows(x)
    if rows == 0 or x.data_ptr() % 16 or (row_stride * x.element_size()) % 16:
        return None
    return rows, row_stride


def _config_key(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    return max(head_dim, 64), 4 if dtype == torch.float32 else 2


def has_tma_tiles(kernel: str, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` has TMA tiles (``TMA_CONFIGS``) at this head dim and dtype (never fp32)."""
    return _config_key(head_dim, dtype) in TMA_CONFIGS.get(kernel, {})


def _tma_wanted(dtype: torch.dtype, device: torch.device) -> bool:
    """TMA is on for this dtype and device: ``A1_ATTENTION_TMA`` (auto: sm_90+ GPUs only; 1: also
    the interpreter; 0: never), bf16/fp16 and a Triton that has ragged descriptors."""
    mode = os.environ.get(TMA_ENV, "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{TMA_ENV} must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or dtype == torch.float32 or kernels.load_ragged is None:
        return False
    if _interpreting():
        return mode == "1"
    return device.type == "cuda" and _device_arch() >= 90


def use_tma(kernel: str, head_dim: int, dtype: torch.dtype, *tensors: Tensor) -> bool:
    """Whether ``kernel`` loads ``tensors`` (its ``TMA_OPERANDS``) through TMA descriptors: TMA is
    on (:func:`_tma_wanted`), ``TMA_CONFIGS`` has tiles for this head dim and dtype and every
    tensor is TMA-addressable (:func:`tma_view`)."""
    return (_tma_wanted(dtype, tensors[0].device) and has_tma_tiles(kernel, head_dim, dtype)
            and all(tma_view(x) is not None for x in tensors))


def _tma_ready(x: Tensor) -> Tensor:
    """``x`` with a contiguous last dim and, where TMA is on, addressable by a descriptor: a
    strided view (e.g. V split from a fused QKV projection) is copied once, a few hundred
    microseconds against the attention's tens of milliseconds at the model's packs."""
    if _tma_wanted(x.dtype, x.device) and tma_view(x) is None:
        return x.contiguous()
    return _lastdim_contiguous(x)


def tma_descriptor(x: Tensor):
    """A host-side ragged TMA descriptor over ``x``'s [rows, H * D] view, whose loads are bounded
    by a document's rows (``triton.tools.ragged_tma``); its block shape is set per launch config
    (:func:`_set_tma_blocks`)."""
    from triton.tools.ragged_tma import create_ragged_descriptor

    rows, row_stride = tma_view(x)
    view = x.as_strided((rows, x.shape[-2] * x.shape[-1]), (row_stride, 1))
    return create_ragged_descriptor(view, [16, 16])


def tma_block(kernel: str, name: str, consts: dict) -> list[int]:
    """The [rows, columns] block of ``kernel``'s TMA operand ``name`` under the constexprs
    ``consts``: query-side tensors move BLOCK_M rows, key-side ones BLOCK_N; the dK/dV kernels
    read D_SPLIT columns at a time."""
    if kernel in _KEY_TILED:
        return [consts["BLOCK_M"], consts["D_SPLIT"]]
    return [consts["BLOCK_N" if name in ("K", "V") else "BLOCK_M"], consts["HEAD_DIM"]]


def _set_tma_blocks(kernel: str):
    def hook(nargs: dict) -> None:
        for name in TMA_OPERANDS[kernel]:
            nargs[name].block_shape = [1, 1] + tma_block(kernel, name, nargs)  # ragged: 4-D
    return hook


def kernel_constants(kernel: str, cfg: TileConfig, head_dim: int, dtype: torch.dtype,
                     tma: bool) -> dict:
    """Every constexpr argument of ``kernel``'s Triton function for one tile config."""
    kw = {"HEAD_DIM": head_dim, "FP32_DOT": dtype == torch.float32, "TMA": tma,
          "ATOMIC_DQ": kernel == "bwd", "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
          "D_SPLIT": cfg.d_split or head_dim, "MASKED_STAGES": cfg.masked_stages or cfg.num_stages}
    return {k: v for k, v in kw.items() if k in KERNELS[kernel].arg_names}


_tuned: dict[tuple[str, int, torch.dtype, bool], object] = {}


def _launch(kernel: str, grid_rows: int, grid_heads: int, args: tuple, head_dim: int,
            dtype: torch.dtype, n_docs: int, tma: bool = False) -> None:
    """Launch ``kernel`` over ``grid_rows // BLOCK + n_docs`` row tiles and ``grid_heads`` heads
    (times ``head_dim // D_SPLIT`` for the dK/dV kernels). ``tma``: ``args`` hold descriptors for
    the kernel's ``TMA_OPERANDS``."""
    fn = KERNELS[kernel]
    block_key = "BLOCK_N" if kernel in _KEY_TILED else "BLOCK_M"
    if _interpreting():
        bm, bn = INTERPRET_TILES
        consts = kernel_constants(kernel, TileConfig(bm, bn, 4, 1, interpret_split(head_dim), 1),
                                  head_dim, dtype, tma)
        if "FP32_DOT" in consts:
            consts["FP32_DOT"] = dtype in (torch.float32, torch.bfloat16)  # see kernels._dot
        if tma:
            _set_tma_blocks(kernel)(dict(zip(fn.arg_names, args), **consts))
        splits = head_dim // consts.get("D_SPLIT", head_dim)
        fn[(grid_rows // consts[block_key] + n_docs, grid_heads * splits)](
            *args, **consts, num_warps=4, num_stages=1)
        return
    key = (kernel, head_dim, dtype, tma)
    if key not in _tuned:
        configs = configs_for(kernel, head_dim, dtype, _device_arch(), tma)
        _tuned[key] = triton.autotune(
            configs=[triton.Config(kernel_constants(kernel, c, head_dim, dtype, tma),
                                   num_warps=c.num_warps, num_stages=c.num_stages,
                                   pre_hook=_set_tma_blocks(kernel) if tma else None)
                     for c in configs],
            key=AUTOTUNE_KEY,
            # Autotuning runs the kernel several times: the atomically accumulated dQ restarts.
            reset_to_zero=["DQ"] if kernel == "bwd" else None,
        )(fn)
    grid = lambda meta: (grid_rows // meta[block_key] + n_docs,  # noqa: E731
                         grid_heads * head_dim // meta.get("D_SPLIT", head_dim))
    _tuned[key][grid](*args)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_t, stride_h) of a [T, H, D] or [B, S, H, D] tensor."""
    return (0, x.stride(0), x.stride(1)) if x.dim() == 3 else (x.stride(0), x.stride(1), x.stride(2))


def _rows(x: Tensor) -> int:
    return x.shape[0] if x.dim() == 3 else x.shape[0] * x.shape[1]


def _operands(tma: bool, *tensors: Tensor) -> tuple:
    """The tensors as a kernel's main-loop operands: TMA descriptors or the tensors."""
    return tuple(tma_descriptor(x) for x in tensors) if tma else tensors


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
        tma = use_tma("fwd", d, q.dtype, q, k, v)
        args = (*_operands(tma, q, k, v), out, lse, cu_seqlens, *_strides(q), *_strides(k),
                *_strides(v), *_strides(out), n_docs, _rows(q), int(q.dim() == 3), hq // hk,
                int(causal), softmax_scale * math.log2(math.e))
        _launch("fwd", _rows(q), hq, args, d, q.dtype, n_docs, tma)
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
                   cu_seqlens: Tensor, causal: bool, softmax_scale: float,
                   deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), shaped like (q, k, v); rows outside every document get zero.
    ``deterministic``: the 7-matmul path (dQ by its own kernel, bitwise reproducible) instead of
    the 5-matmul one (dQ added by fp32 atomics)."""
    do = _tma_ready(do) if tma_view(q) is not None else _lastdim_contiguous(do)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    n_docs = cu_seqlens.numel() - 1
    if n_docs == 0 or _rows(q) == 0:
        return torch.zeros_like(q), dk, dv
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    delta = torch.empty_like(lse)
    common = (n_docs, _rows(q), int(q.dim() == 3), hq // hk, int(causal),
              softmax_scale * math.log2(math.e), softmax_scale)
    if deterministic:
        dq = torch.zeros_like(q)
        tma_dq = use_tma("bwd_dq", d, q.dtype, q, k, v, out, do)
        _launch("bwd_dq", _rows(q), hq,
                (*_operands(tma_dq, q, k, v, out, do), dq, lse, delta, cu_seqlens,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do),
                 *_strides(dq), *common), d, q.dtype, n_docs, tma_dq)
        # dQ is not written by this kernel: dk stands in for its pointer, with zero strides.
        tma_q = use_tma("bwd_dkdv", d, q.dtype, q, do)
        q_ops = _operands(tma_q, q, do)
        _launch("bwd_dkdv", _rows(q), hk,
                (q_ops[0], k, v, q_ops[1], dk, dv, dk, lse, delta, cu_seqlens, *_strides(q),
                 *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                 0, 0, 0, *common), d, q.dtype, n_docs, tma_q)
        return dq, dk, dv
    _launch("bwd_delta", _rows(q), hq,
            (out, do, delta, cu_seqlens, *_strides(out), *_strides(do), n_docs, _rows(q),
             int(q.dim() == 3)), d, q.dtype, n_docs)
    dq_acc = torch.zeros_like(q, dtype=torch.float32)  # q's layout (strides), fp32
    _launch("bwd", _rows(q), hk,
            (q, k, v, do, dk, dv, dq_acc, lse, delta, cu_seqlens, *_strides(q), *_strides(k),
             *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *_strides(dq_acc),
             *common), d, q.dtype, n_docs)
    dq = torch.empty_like(q)
    torch.mul(dq_acc, softmax_scale, out=dq)  # scale and round in one pass
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, causal, softmax_scale, deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class PackedAttentionFunction(torch.autograd.Function):
    """Autograd over the two custom ops; saves q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, softmax_scale, seq_first, deterministic):
        out, lse = torch.ops.a1_kernels.attention_fwd(q, k, v, cu_seqlens, causal, softmax_scale,
                                                      seq_first)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.a1_kernels.attention_bwd(do, q, k, v, out, lse, cu_seqlens,
                                                        ctx.causal, ctx.softmax_scale,
                                                        ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None


def _scale(q: Tensor, softmax_scale: float | None) -> float:
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:  # the kernels fold the scale into exp2(s * scale - max): needs scale > 0
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    return scale


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
                     causal: bool = True, softmax_scale: float | None = None,
                     deterministic: bool = True) -> Tensor:
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
        softmax_scale: defaults to ``1 / sqrt(D)``; must be > 0.
        deterministic: backward with a separate dQ kernel (7 matmuls, bitwise reproducible;
            the default: on sm_90 its tiles compile without spills) or, if False, with dQ
            added by fp32 atomics in the dK/dV kernel (5 matmuls; spills at head dims 128/256
            with Triton 3.7.1, see BENCHMARKS.md).

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
    scale = _scale(q, softmax_scale)
    q, k, v = (_tma_ready(t) for t in (q, k, v))
    return PackedAttentionFunction.apply(q, k, v, cu_seqlens, bool(causal), scale, False,
                                         bool(deterministic))


def batched_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                      softmax_scale: float | None = None, layout: str = "bshd",
                      deterministic: bool = True) -> Tensor:
    """Attention over an ordinary batch of equal-length sequences, through the packed kernels.

    Args:
        q: [B, S, Hq, D] (``layout="bshd"``) or [S, B, Hq, D] (``layout="sbhd"``, megatron's).
        k, v: [B, S, Hkv, D] or [S, B, Hkv, D]; GQA, dtypes and head dims as in
            ``packed_attention``.
        causal: each row sees keys up to its own position in its own sequence.
        softmax_scale: defaults to ``1 / sqrt(D)``; must be > 0.
        deterministic: as in ``packed_attention``.

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
    scale = _scale(q, softmax_scale)
    out = PackedAttentionFunction.apply(q, k, v, cu_seqlens, bool(causal), scale, layout == "sbhd",
                                        bool(deterministic))
    return out.transpose(0, 1) if layout == "sbhd" else out
