"""Cross-entropy on one chunk of logits: Triton kernels and their launchers.

A chunk is ``[C, V_local]`` logits of C tokens on this rank's vocabulary shard (the output of
``hidden[chunk] @ weight.T``). Two kernels stream over it, BLOCK_R rows × BLOCK_V columns at a
time, and never write anything of size V except the gradient, in place:

``_ce_stats_kernel``  per row: the shard's max ``m``, ``s = Σ_v exp(z_v − m)`` (online: the
                      running sum is rescaled whenever the max grows) and the target logit
                      ``z[target]`` (0 where the target is on another shard). fp32 out.
``_ce_grad_kernel``   per row, in place: ``z_v ← g · (exp(z_v − lse) − 1[v = target])``, the
                      gradient of ``g · (lse − z[target])`` with respect to the logits, written
                      in the logits' dtype (what megatron-core's cross-entropy hands back to the
                      output layer after its fp32 maths).

Both read the logits in any float dtype and compute in fp32. Under ``TRITON_INTERPRET=1`` one
small tile (``INTERPRET_CONFIG``) is used so short test rows span several blocks.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_stats_kernel(
    z_ptr,  # [C, V_local] logits (fp32/bf16/fp16), unit stride along V
    stride_z,  # row stride of z (elements)
    tgt_ptr,  # [C] int32: target column on this shard, or -1 when another shard owns it
    max_ptr,  # [C] fp32 out: row max on this shard
    sum_ptr,  # [C] fp32 out: Σ exp(z - max) on this shard
    tlogit_ptr,  # [C] fp32 out: z[target] (0 when not owned)
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + offs
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf row stays at s = 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    owned = row_ok & (tgt >= 0) & (tgt < n_cols)
    t = tl.load(z_ptr + rows.to(tl.int64) * stride_z + tgt, mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(sum_ptr + rows, s, mask=row_ok)
    tl.store(tlogit_ptr + rows, t, mask=row_ok)


@triton.jit
def _ce_grad_kernel(
    z_ptr,  # [C, V_local] logits in, d loss / d logits out (same dtype), unit stride along V
    stride_z,
    tgt_ptr,  # [C] int32 target column on this shard or -1
    lse_ptr,  # [C] fp32 log Σ_v exp(z_v) over the whole (all-shard) vocabulary
    g_ptr,  # [C] fp32 d L / d loss of the row
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RNE_BF16: tl.constexpr = False,  # see chunk_grad_
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + offs
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        d = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
        if RNE_BF16:  # round to nearest even by hand, so the cast below is exact
            bits = d.to(tl.int32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            d = (bits & -65536).to(tl.float32, bitcast=True)
        tl.store(base + cols[None, :], d.to(z_ptr.dtype.element_ty), mask=ok)


# One launch config per kernel on a GPU: a row per program streaming BLOCK_V columns (at
# V_local ~ 124K that is ~30 iterations); sm_80/sm_90 compile it without spills
# (kernels/cross_entropy/aot.py, tests/test_cross_entropy_compile.py).
GPU_CONFIG = {"BLOCK_R": 1, "BLOCK_V": 4096, "num_warps": 8, "num_stages": 2}
# Under the interpreter: several rows per program (fewer Python-level programs) and short blocks.
INTERPRET_CONFIG = {"BLOCK_R": 16, "BLOCK_V": 128, "num_warps": 4, "num_stages": 1}


def launch_config() -> dict:
    return dict(INTERPRET_CONFIG if interpreting() else GPU_CONFIG)


def _check(logits: torch.Tensor, *rows: torch.Tensor) -> None:
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits must be [C, V_local] with unit stride along V, got shape "
                         f"{tuple(logits.shape)}, strides {logits.stride()}")
    if any(r.shape != (logits.shape[0],) or not r.is_contiguous() for r in rows):
        raise ValueError("per-row inputs must be contiguous [C] tensors")


# ----------------------------------------------------------------------------------------------
# Launchers (torch.library ops, so torch.compile can trace through them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("a1_kernels::cross_entropy_chunk_stats", mutates_args=())
def chunk_stats(logits: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [C, V_local]: (max, Σ exp(z − max), z[target]), fp32 [C] each.

    ``target`` [C] int32 holds the column on this shard, -1 where another shard owns it.
    """
    _check(logits, target)
    n_rows, n_cols = logits.shape
    out = [torch.empty((n_rows,), dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n_rows == 0:
        return out[0], out[1], out[2]
    cfg = launch_config()
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _ce_stats_kernel[grid](logits, logits.stride(0), target, *out, n_rows, n_cols, **cfg)
    return out[0], out[1], out[2]


@chunk_stats.register_fake
def _(logits, target):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("a1_kernels::cross_entropy_chunk_grad_", mutates_args=("logits",))
def chunk_grad_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                grad: torch.Tensor) -> None:
    """Overwrite ``logits`` [C, V_local] with ``grad[:, None] * (softmax − onehot(target))``.

    ``lse`` [C] fp32 is the log-sum-exp over the whole vocabulary (all shards), ``grad`` [C]
    fp32 the upstream gradient of each row's loss, ``target`` as in :func:`chunk_stats`.
    """
    _check(logits, target, lse, grad)
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    cfg = launch_config()
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    # The interpreter casts fp32 -> bf16 by truncation (NumPy has no bf16) where a GPU rounds to
    # nearest even; a bias toward zero that adds up in the matmuls downstream. Interpreted bf16
    # runs round by hand first, so they give the GPU's numbers.
    rne = interpreting() and logits.dtype == torch.bfloat16
    _ce_grad_kernel[grid](logits, logits.stride(0), target, lse, grad, n_rows, n_cols,
                          RNE_BF16=rne, **cfg)


@chunk_grad_.register_fake
def _(logits, target, lse, grad):
    return None
