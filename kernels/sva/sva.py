"""SVA loss at the logits level: Triton kernels, launchers, one autograd Function, ``sva_loss``.

Maths (``../shared/DESIGN.md`` §4): S = teacher top-k of a row; both distributions renormalised on
S; loss = Σ_{u∈S} p̄_s(u) (log p̄_s(u) − log p̄_t(u)). Only the teacher's top-k needs the whole row;
everything after it works on [N, k] values.

Kernels
-------
``_sva_topk_kernel``      one program per row: one streaming pass over the teacher's row keeping a
                          running top-k of 64-bit *keys* (order-preserving float bits in the high
                          half, ``2^31 - 1 - token_id`` in the low half), so one integer max both
                          ranks by value and breaks ties to the lower id, and the result carries
                          the exact fp32 value and the global id. Per block of the row: if no
                          element beats the current k-th key, nothing else is done; if a few do,
                          they are inserted one by one (max → replace the min slot); if many do
                          (the first blocks), a bitonic top-k merges the block with the buffer.
``_sva_set_loss_kernel``  [N, k] gathered student/teacher logits → loss [N] and the gradient
                          coefficients ``c = ∂loss/∂z_s`` on S ([N, k]) — saved for backward, so
                          backward never touches the teacher again.

Vocab-parallel (``tp_group``): every rank runs the top-k kernel on its shard with its vocab offset;
the [N, k] keys are all-gathered and the global top-k of the tp·k candidates is taken (integer
keys: exact, same tie-break); each rank gathers the student logits it owns on S, one all-reduce
(sum) of [N, k] completes them; every rank then holds the full per-position loss (replicated, as
megatron-core's vocab-parallel cross entropy) and writes the gradient of its own shard only.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Above this many new entrants in one block, merge by bitonic top-k instead of one by one. The
# interpreter runs bitonic networks very slowly, so there it inserts one by one unless a test sets
# this (both paths are tested; on a GPU the merge path serves the first blocks of every row).
SORT_MIN = 1 << 30 if INTERPRET else 16
_INT32_MAX = 2**31 - 1
_INT64_MIN = -(2**63)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sva_topk_kernel(
    t_ptr,  # [N, V_local] teacher logits (fp32/bf16/fp16), unit stride along V
    stride_t,  # row stride of t (elements)
    row_ptr,  # [R] int32: the rows to process (masked rows are skipped entirely)
    keys_ptr,  # [R, K] int64 out: top-k keys, descending
    n_valid,  # columns < n_valid are real vocabulary on this shard
    vocab_offset,  # global id of local column 0
    K: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= K (buffer size)
    BLOCK_V: tl.constexpr,  # >= KP, power of two
    SORT_MIN: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(row_ptr + pid).to(tl.int64)
    t_row = t_ptr + row * stride_t
    slots = tl.arange(0, KP)
    # Distinct sentinels below every real key (-inf's key is ~ -2^62.99): each slot is unique.
    top = tl.full([KP], -9223372036854775807, tl.int64) + slots.to(tl.int64)
    thr = tl.min(top, axis=0)
    offs = tl.arange(0, BLOCK_V)
    # The next vocabulary block is loaded one iteration ahead: its global-memory latency
    # overlaps this block's compare / merge work instead of stalling at the top of the loop.
    x_next = tl.load(t_row + offs, mask=offs < n_valid, other=0.0)
    for v0 in range(0, n_valid, BLOCK_V):
        cols = v0 + offs
        valid = cols < n_valid
        x = x_next.to(tl.float32) + 0.0  # -0.0 -> +0.0
        ahead = cols + BLOCK_V
        x_next = tl.load(t_row + ahead, mask=ahead < n_valid, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        low = (2147483647 - (vocab_offset + cols)).to(tl.int64)
        key = (ordered.to(tl.int64) << 32) | low
        key = tl.where(valid, key, -9223372036854775807 - 1)
        n_above = tl.sum((key > thr).to(tl.int32), axis=0)
        if SORT_MIN < KP:
            if n_above > SORT_MIN:
                block_top = tl.topk(key, KP)
                top = tl.topk(tl.cat(top, block_top, can_reorder=False), KP)
            else:
                for _ in range(0, tl.minimum(n_above, KP)):
                    m = tl.max(key, axis=0)
                    mn = tl.min(top, axis=0)
                    top = tl.where(top == mn, tl.maximum(m, mn), top)
                    key = tl.where(key == m, -9223372036854775807 - 1, key)
        else:
            for _ in range(0, tl.minimum(n_above, KP)):
                m = tl.max(key, axis=0)
                mn = tl.min(top, axis=0)
                top = tl.where(top == mn, tl.maximum(m, mn), top)
                key = tl.where(key == m, -9223372036854775807 - 1, key)
        thr = tl.min(top, axis=0)
    top = tl.sort(top, descending=True)
    tl.store(keys_ptr + pid.to(tl.int64) * K + slots, top, mask=slots < K)


@triton.jit
def _sva_set_loss_kernel(
    s_ptr,  # [R, K] fp32 student logits on S
    t_ptr,  # [R, K] fp32 teacher logits on S
    loss_ptr,  # [R] fp32 out
    coef_ptr,  # [R, K] fp32 out: d loss / d student logit
    n_rows,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, KP)
    m = (rows < n_rows)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    s = tl.load(s_ptr + offs, mask=m, other=float("-inf"))
    t = tl.load(t_ptr + offs, mask=m, other=float("-inf"))
    # (z - max) - log Σ exp(z - max): keeps log k even when |max| is ~1e38.
    s_max = tl.max(s, axis=1)
    dead = s_max == float("-inf")  # no student mass on S: the row's loss is 0
    s_sh = s - tl.where(dead, 0.0, s_max)[:, None]
    log_ps = s_sh - tl.log(tl.sum(tl.exp(s_sh), axis=1))[:, None]
    t_max = tl.max(t, axis=1)
    t_sh = t - tl.where(t_max == float("-inf"), 0.0, t_max)[:, None]
    log_pt = t_sh - tl.log(tl.sum(tl.exp(t_sh), axis=1))[:, None]
    ps = tl.where(dead[:, None], 0.0, tl.exp(log_ps))
    support = ps > 0
    diff = tl.where(support, log_ps - log_pt, 0.0)
    loss = tl.sum(tl.where(support, ps * diff, 0.0), axis=1)
    coef = tl.where(support, ps * (diff - loss[:, None]), 0.0)
    tl.store(loss_ptr + rows, loss, mask=rows < n_rows)
    tl.store(coef_ptr + offs, coef, mask=m)


# (BLOCK_V, num_warps) the autotuner picks from. 4 warps at BLOCK_V 1024/2048 are left out: ptxas
# spills them (8-16 B at k=32/64, BLOCK_V 2048; at k=256, BLOCK_V 1024) on sm_90
# (tools/kernel_report.py, tests/test_sva_compile.py).
TOPK_TILES = ((1024, 8), (2048, 8), (4096, 4), (4096, 8))
# Tiles that spill 8 B on sm_80/sm_90 at some top-k buffer sizes (KP) with the next vocabulary
# block loaded one iteration ahead: left out for those sizes.
TOPK_SPILLING = {32: {(4096, 4)}, 256: {(4096, 8)}}


def _spill_free(kp, block_v: int, num_warps: int) -> bool:
    return (block_v, num_warps) not in TOPK_SPILLING.get(kp, set())


def _topk_configs(kp: int | None = None):
    """The top-k kernel's autotune configs; for buffer size ``kp`` only its spill-free ones."""
    return [triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=1) for bv, nw in TOPK_TILES
            if _spill_free(kp, bv, nw)]


def _prune_topk(configs, named_args, **kwargs):
    kp = kwargs.get("KP", named_args.get("KP"))
    return [c for c in configs if _spill_free(kp, c.kwargs["BLOCK_V"], c.num_warps)]


# Fixed launch config under the interpreter (autotune needs a GPU to benchmark).
INTERPRET_TOPK_CONFIG = {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1}
SET_LOSS_CONFIG = {"BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
_sva_topk_autotuned = triton.autotune(configs=_topk_configs(), key=["K", "n_valid"],
                                      prune_configs_by={"early_config_prune": _prune_topk},
                                      )(_sva_topk_kernel)


def _pow2(k: int) -> int:
    return triton.next_power_of_2(k)


# ----------------------------------------------------------------------------------------------
# Launchers (registered as torch.library ops so they survive torch.compile)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("a1_kernels::sva_topk_keys", mutates_args=())
def sva_topk_keys(teacher_logits: torch.Tensor, rows: torch.Tensor, topk: int, n_valid: int,
                  vocab_offset: int) -> torch.Tensor:
    """Top-k keys [R, k] (int64, descending) of ``teacher_logits[rows, :n_valid]``."""
    n_rows = rows.numel()
    keys = torch.empty((n_rows, topk), dtype=torch.int64, device=teacher_logits.device)
    if n_rows == 0:
        return keys
    kp = _pow2(topk)
    args = (teacher_logits, teacher_logits.stride(0), rows, keys, n_valid, vocab_offset)
    if INTERPRET:
        cfg = dict(INTERPRET_TOPK_CONFIG)
        cfg["BLOCK_V"] = max(cfg["BLOCK_V"], kp)
        sort_min = min(SORT_MIN, kp)  # >= KP compiles the merge branch out
        _sva_topk_kernel[(n_rows,)](*args, K=topk, KP=kp, SORT_MIN=sort_min, **cfg)
    else:
        _sva_topk_autotuned[(n_rows,)](*args, K=topk, KP=kp, SORT_MIN=min(SORT_MIN, kp))
    return keys


@sva_topk_keys.register_fake
def _(teacher_logits, rows, topk, n_valid, vocab_offset):
    return teacher_logits.new_empty((rows.numel(), topk), dtype=torch.int64)


@torch.library.custom_op("a1_kernels::sva_set_loss", mutates_args=())
def sva_set_loss(student_on_set: torch.Tensor, teacher_on_set: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss [R] and gradient coefficients [R, k] from fp32 logits gathered on S ([R, k] each)."""
    n_rows, k = student_on_set.shape
    loss = torch.empty((n_rows,), dtype=torch.float32, device=student_on_set.device)
    coef = torch.empty((n_rows, k), dtype=torch.float32, device=student_on_set.device)
    if n_rows == 0:
        return loss, coef
    cfg = dict(SET_LOSS_CONFIG)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _sva_set_loss_kernel[grid](student_on_set.contiguous(), teacher_on_set.contiguous(), loss, coef,
                               n_rows, K=k, KP=_pow2(k), **cfg)
    return loss, coef


@sva_set_loss.register_fake
def _(student_on_set, teacher_on_set):
    n_rows, k = student_on_set.shape
    return (student_on_set.new_empty((n_rows,), dtype=torch.float32),
            student_on_set.new_empty((n_rows, k), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Keys, the vocab-parallel exchange, and the per-shard pieces shared with the fused path
# ----------------------------------------------------------------------------------------------
def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys → (fp32 values, int64 global ids)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    values = bits.view(torch.float32)
    ids = _INT32_MAX - (keys & 0xFFFFFFFF)
    return values, ids


def global_topk_keys(local_keys: torch.Tensor, topk: int, tp_group) -> torch.Tensor:
    """Exchange every rank's [R, k] local top-k keys and keep the global top-k [R, k]."""
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return local_keys
    world = torch.distributed.get_world_size(tp_group)
    gathered = [torch.empty_like(local_keys) for _ in range(world)]
    torch.distributed.all_gather(gathered, local_keys.contiguous(), group=tp_group)
    candidates = torch.cat(gathered, dim=1)  # [R, world * k]
    return torch.topk(candidates, topk, dim=1, sorted=True).values


def shard_layout(v_local: int, vocab_size: int | None, tp_group) -> tuple[int, int]:
    """(vocab_offset, n_valid) of this rank's shard in megatron-core's contiguous layout."""
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    offset = rank * v_local
    total = v_local * (1 if tp_group is None else torch.distributed.get_world_size(tp_group))
    vocab = total if vocab_size is None else vocab_size
    return offset, max(0, min(v_local, vocab - offset))


def salient_set(teacher_logits: torch.Tensor, rows: torch.Tensor, topk: int, vocab_size, tp_group):
    """Global salient set of ``rows``: (teacher values fp32 [R, k], local ids [R, k] clamped into
    the shard, owned mask [R, k])."""
    v_local = teacher_logits.shape[1]
    offset, n_valid = shard_layout(v_local, vocab_size, tp_group)
    keys = sva_topk_keys(teacher_logits, rows, topk, n_valid, offset)
    keys = global_topk_keys(keys, topk, tp_group)
    values, ids = decode_keys(keys)
    local = ids - offset
    owned = (local >= 0) & (local < v_local)
    return values, local.clamp(0, v_local - 1), owned


def complete_student(on_set: torch.Tensor, owned: torch.Tensor, tp_group) -> torch.Tensor:
    """Zero the entries this rank does not own and sum over the tensor-parallel group."""
    on_set = torch.where(owned, on_set.float(), torch.zeros((), device=on_set.device))
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(on_set, group=tp_group)
    return on_set


def check_logits(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, V_local], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary")


def check_topk(topk: int, v_local: int, vocab_size: int | None, tp_group) -> None:
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    total = v_local * world
    if vocab_size is not None and not 0 < vocab_size <= total:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {total}] (V_local * tp)")
    vocab = total if vocab_size is None else vocab_size
    if not 1 <= topk <= vocab:
        raise ValueError(f"topk={topk} must be in [1, vocab_size={vocab}]")
    if topk > 1024:
        raise ValueError(f"topk={topk} > 1024 is not supported")


def active_rows(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if mask is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    if mask.shape != (n,):
        raise ValueError(f"mask must be [N={n}], got {tuple(mask.shape)}")
    return mask.bool().nonzero().flatten().to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Autograd Function and public function
# ----------------------------------------------------------------------------------------------
class SVALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, topk, vocab_size, tp_group, mask):
        n = student_logits.shape[0]
        rows = active_rows(mask, n, student_logits.device)
        with torch.no_grad():
            t_on_set, local, owned = salient_set(teacher_logits, rows, topk, vocab_size, tp_group)
            s_on_set = student_logits[rows.long()[:, None], local]
            s_on_set = complete_student(s_on_set, owned, tp_group)
            loss_rows, coef = sva_set_loss(s_on_set, t_on_set)
        loss = student_logits.new_zeros((n,), dtype=torch.float32)
        loss[rows.long()] = loss_rows
        ctx.save_for_backward(rows, local, torch.where(owned, coef, 0.0))
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, local, coef = ctx.saved_tensors
        rows = rows.long()
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_loss.device)
        values = (grad_loss.float()[rows, None] * coef).to(ctx.dtype)
        # Non-owned entries carry 0 at a clamped id: accumulate so they cannot overwrite.
        grad.index_put_((rows[:, None].expand_as(local), local), values, accumulate=True)
        return grad, None, None, None, None, None


def sva_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    topk: int,
    *,
    vocab_size: int | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Salient Vocabulary Alignment loss per position (reverse KL on the teacher's top-k set).

    Args:
        student_logits: [N, V_local] float32/bfloat16/float16, unit stride along V. Differentiable.
        teacher_logits: [N, V_local], same shape (any supported dtype). Gets no gradient.
        topk: size k of the salient set (1 ≤ k ≤ min(1024, vocab_size)).
        vocab_size: real vocabulary size; ids ≥ vocab_size (padded rows of the LM head) are never
            salient. Default: all V_local · tp columns.
        tp_group: tensor-parallel group when the vocabulary is sharded (megatron-core's
            vocab-parallel layout: rank r holds ids [r·V_local, (r+1)·V_local)). Every rank
            gets the full per-position loss; the gradient of each rank's shard is its share.
        mask: optional [N] bool/int; rows with 0 are skipped (loss 0, gradient 0, never read).

    Returns:
        [N] float32. Backward writes ``student_logits.grad`` only at the k salient entries of
        each row (zeros elsewhere), in the student's dtype.

    Ties in the teacher go to the lower token id; -0.0 equals +0.0. A salient entry with zero
    student probability contributes 0; a salient entry with zero teacher probability and
    non-zero student probability gives +inf (reverse KL off the teacher's support). A row where
    every salient student logit is -inf (no student mass on S) has loss 0 and gradient 0.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    check_topk(topk, student_logits.shape[1], vocab_size, tp_group)
    return SVALossFunction.apply(student_logits, teacher_logits.detach(), topk, vocab_size,
                                 tp_group, mask)
