"""Triton kernels of packed (varlen) attention, FlashAttention-2 style.

Layout seen by every kernel: a tensor holds ``n_docs`` documents; document ``i`` has
``cu_seqlens[i+1] - cu_seqlens[i]`` rows, and row ``r`` of head ``h`` of document ``i`` lives at

    base + (cu_seqlens[i] * packed + r) * stride_t + i * stride_b + h * stride_h

so one kernel serves THD packs (``packed=1, stride_b=0``) and ordinary ``[B, S, H, D]`` batches
(``packed=0``, ``cu_seqlens = arange(B + 1) * S``) without copies. Log-sum-exp and ``delta`` are
kernel-owned ``[H, T]`` fp32 buffers indexed by ``cu_seqlens[i] + r`` in both cases.

Tiles: the programs of axis 0 are the row tiles of *all* documents, packed back to back:
document ``i`` owns tiles ``[cu[i] // BLOCK + i, cu[i] // BLOCK + i + cdiv(len_i, BLOCK))``
(disjoint because ``cdiv(L, B) <= floor((c + L) / B) - floor(c / B) + 1``), so a grid of
``T // BLOCK + n_docs`` programs covers every document without ``max_seqlen`` and a program
finds its document by a binary search over ``cu_seqlens``. Tiles run in reverse order so that
the longest causal rows start first. Inner loops visit only key tiles inside the document and
on or below the causal diagonal; masks are applied only on the boundary tiles.

Kernels: the forward; ``attn_bwd_dq_kernel`` + ``attn_bwd_dkdv_kernel`` (the deterministic,
7-matmul backward); ``attn_bwd_delta_kernel`` + ``attn_bwd_dkdv_kernel(ATOMIC_DQ=True)`` (5
matmuls: dK/dV per key tile with that tile's share of dQ added by fp32 atomics). The dK/dV
kernel may split the head dim over programs (``D_SPLIT``): each recomputes the full-width scores
and dP but accumulates only its columns of dK/dV (and dQ), which is what keeps head dim 256 in
registers.

Loads of the query-side tiles and of the main loops' operands (Q, K, V of the forward; Q, O, dO,
K, V of the dQ kernel; Q, dO of the dK/dV kernel) come either through pointers (``TMA=False``: cp.async on sm_80+) or, with ``TMA=True`` (sm_90+), from
host-side *ragged* tensor descriptors (``triton.tools.ragged_tma``) over the ``[rows, heads *
HEAD_DIM]`` view of the tensor, row ``cu_seqlens[i] + r``: one TMA copy per tile, no address
arithmetic, and the bounds checked by the hardware per document, so rows past a document's end
read as zero, as the pointer path's masked loads do (never the next document's rows).
"""
import triton
import triton.language as tl

try:  # Triton >= 3.4; without it the launchers never pick TMA (ops.use_tma)
    from triton.tools.ragged_tma import load_ragged
except ImportError:  # pragma: no cover - older Triton
    load_ragged = None


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # FP32_DOT: fp32 operands at fp32 accuracy ("tf32x3": three tf32 tensor-core products; plain
    # tf32 would lose to PyTorch's own fp32 error). Used for fp32 inputs and, under the
    # interpreter only, for bf16 (Triton 3.7's interpreter mis-reads bf16 tl.dot operands; the
    # upcast is exact, so the maths is the tensor cores' bf16 x bf16 -> fp32).
    if FP32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _locate_tile(cu_seqlens, n_docs, BLOCK: tl.constexpr):
    """(doc, first token of doc, doc length, first local row of this tile)."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    lo = tl.program_id(0) * 0
    hi = n_docs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(cu_seqlens + mid) // BLOCK + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    start = tl.load(cu_seqlens + lo)
    seqlen = tl.load(cu_seqlens + lo + 1) - start
    row0 = (tile - start // BLOCK - lo) * BLOCK
    return lo, start, seqlen, row0


@triton.jit
def _head_base(X, tok0, d64, head, stride_b, stride_t, stride_h, TMA: tl.constexpr):
    """Where ``_load_rows`` reads one head of a document from: the pointer to its row 0, or with
    TMA the descriptor itself (its loads name rows and columns)."""
    if TMA:
        base = X
    else:
        base = X + tok0 * stride_t + d64 * stride_b + head * stride_h
    return base


@triton.jit
def _load_rows(X, x_base, stride_t, start, row0, col, offs_r, offs_c, seqlen,
               MASK: tl.constexpr, TMA: tl.constexpr):
    """Rows ``row0 + offs_r`` (document-local) and columns ``col + offs_c`` of one head of the
    document whose rows are ``[start, start + seqlen)``; rows at or past ``seqlen`` read as zero
    (always with TMA, where the descriptor's bounds are the document's; with pointers, when
    ``MASK``). TMA: ``X`` is a ragged descriptor over the [rows, heads * head dim] view (``col``
    its column); otherwise ``x_base`` points at the document's row 0 of the head."""
    if TMA:
        x = load_ragged(X, start, seqlen, [row0, col])
    else:
        ptrs = x_base + (row0 + offs_r)[:, None] * stride_t + offs_c[None, :]
        if MASK:
            x = tl.load(ptrs, mask=(row0 + offs_r)[:, None] < seqlen, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kt, stride_vt, start, kv_col,
              offs_m, offs_n, offs_d, col0, seqlen, causal, qk_scale, MASK: tl.constexpr,
              TMA: tl.constexpr, FP32_DOT: tl.constexpr):
    # m_i is kept in scaled (log2) units: the scale then rides in the exponent's FMA,
    # s * qk_scale - m, instead of a separate multiply of every score (qk_scale > 0).
    cols = col0 + offs_n
    k = _load_rows(K, k_base, stride_kt, start, col0, kv_col, offs_n, offs_d, seqlen, MASK, TMA)
    v = _load_rows(V, v_base, stride_vt, start, col0, kv_col, offs_n, offs_d, seqlen, MASK, TMA)
    s = _dot(q, tl.trans(k), FP32_DOT)
    if MASK:
        keep = (cols[None, :] < seqlen) & ((causal == 0) | (cols[None, :] <= offs_m[:, None]))
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASK:  # a row with no visible key in this tile and none before keeps m = -inf
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
    return acc, m_new, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    n_docs, n_tokens, packed, group, causal, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr,
):
    """O = softmax(Q K^T * scale) V per document; LSE = natural log-sum-exp of each row.

    ``qk_scale`` is ``softmax_scale * log2(e)``; ``group`` = query heads per KV head. ``TMA``:
    Q, K and V are tensor descriptors with blocks [BLOCK_M | BLOCK_N, HEAD_DIM] (see the module
    docstring).
    """
    doc, start, seqlen, m0 = _locate_tile(cu_seqlens, n_docs, BLOCK_M)
    if m0 < seqlen:
        h = tl.program_id(1)
        hk = h // group
        tok0 = (start * packed).to(tl.int64)
        d64 = doc.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = _load_rows(Q, _head_base(Q, tok0, d64, h, stride_qb, stride_qt, stride_qh, TMA),
                       stride_qt, start, m0, h * HEAD_DIM, tl.arange(0, BLOCK_M), offs_d, seqlen,
                       True, TMA)
        k_base = _head_base(K, tok0, d64, hk, stride_kb, stride_kt, stride_kh, TMA)
        v_base = _head_base(V, tok0, d64, hk, stride_vb, stride_vt, stride_vh, TMA)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Key tiles fully inside the document and fully at or below the diagonal: no mask.
        hi = seqlen
        full = (seqlen // BLOCK_N) * BLOCK_N
        if causal != 0:
            hi = tl.minimum(seqlen, m0 + BLOCK_M)
            full = tl.minimum(full, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        kv_col = hk * HEAD_DIM
        for col0 in range(0, full, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kt, stride_vt,
                                      start, kv_col, offs_m, offs_n, offs_d, col0, seqlen, causal,
                                      qk_scale, False, TMA, FP32_DOT)
        for col0 in range(full, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kt, stride_vt,
                                      start, kv_col, offs_m, offs_n, offs_d, col0, seqlen, causal,
                                      qk_scale, True, TMA, FP32_DOT)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_safe[:, None]
        o_ptrs = O + tok0 * stride_ot + d64 * stride_ob + h * stride_oh \
            + offs_m[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < seqlen)
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + h.to(tl.int64) * n_tokens + start + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, k_base, v_base, stride_kt, stride_vt, start, kv_col,
             offs_m, offs_n, offs_d, col0, seqlen, causal, qk_scale, MASK: tl.constexpr,
             TMA: tl.constexpr, FP32_DOT: tl.constexpr):
    cols = col0 + offs_n
    k = _load_rows(K, k_base, stride_kt, start, col0, kv_col, offs_n, offs_d, seqlen, MASK, TMA)
    v = _load_rows(V, v_base, stride_vt, start, col0, kv_col, offs_n, offs_d, seqlen, MASK, TMA)
    p = tl.math.exp2(_dot(q, tl.trans(k), FP32_DOT) * qk_scale - lse2[:, None])
    if MASK:
        keep = (cols[None, :] < seqlen) & ((causal == 0) | (cols[None, :] <= offs_m[:, None]))
        p = tl.where(keep, p, 0.0)
    dp = _dot(do, tl.trans(v), FP32_DOT)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, FP32_DOT)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, cu_seqlens,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    n_docs, n_tokens, packed, group, causal, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr,
):
    """dQ for one query tile; also writes DELTA = rowsum(dO * O) for the dK/dV kernel.
    ``TMA``: Q, O, dO (blocks [BLOCK_M, HEAD_DIM]) and K, V ([BLOCK_N, HEAD_DIM]) are tensor
    descriptors."""
    doc, start, seqlen, m0 = _locate_tile(cu_seqlens, n_docs, BLOCK_M)
    if m0 < seqlen:
        h = tl.program_id(1)
        hk = h // group
        tok0 = (start * packed).to(tl.int64)
        d64 = doc.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m[:, None] < seqlen
        rows = tl.arange(0, BLOCK_M)
        q = _load_rows(Q, _head_base(Q, tok0, d64, h, stride_qb, stride_qt, stride_qh, TMA),
                       stride_qt, start, m0, h * HEAD_DIM, rows, offs_d, seqlen, True, TMA)
        o = _load_rows(O, _head_base(O, tok0, d64, h, stride_ob, stride_ot, stride_oh, TMA),
                       stride_ot, start, m0, h * HEAD_DIM, rows, offs_d, seqlen, True, TMA)
        do = _load_rows(DO, _head_base(DO, tok0, d64, h, stride_dob, stride_dot, stride_doh, TMA),
                        stride_dot, start, m0, h * HEAD_DIM, rows, offs_d, seqlen, True, TMA)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        row_idx = h.to(tl.int64) * n_tokens + start + offs_m
        tl.store(DELTA + row_idx, delta, mask=offs_m < seqlen)
        lse2 = tl.load(LSE + row_idx, mask=offs_m < seqlen, other=0.0) * 1.4426950408889634

        k_base = _head_base(K, tok0, d64, hk, stride_kb, stride_kt, stride_kh, TMA)
        v_base = _head_base(V, tok0, d64, hk, stride_vb, stride_vt, stride_vh, TMA)
        kv_col = hk * HEAD_DIM
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = seqlen
        full = (seqlen // BLOCK_N) * BLOCK_N
        if causal != 0:
            hi = tl.minimum(seqlen, m0 + BLOCK_M)
            full = tl.minimum(full, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        for col0 in range(0, full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, K, V, k_base, v_base, stride_kt, stride_vt,
                          start, kv_col, offs_m, offs_n, offs_d, col0, seqlen, causal, qk_scale,
                          False, TMA, FP32_DOT)
        for col0 in range(full, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, K, V, k_base, v_base, stride_kt, stride_vt,
                          start, kv_col, offs_m, offs_n, offs_d, col0, seqlen, causal, qk_scale,
                          True, TMA, FP32_DOT)
        tl.store(DQ + tok0 * stride_dqt + d64 * stride_dqb + h * stride_dqh
                 + offs_m[:, None] * stride_dqt + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, k_own, v_own, k_oth, v_oth, Q, DO, q_base, do_base, lse_base, delta_base,
               dq_base, stride_qt, stride_dot, stride_dqt, start, q_col, o_col, offs_m, offs_n,
               offs_c, offs_o, row0, seqlen, causal, qk_scale, MASK: tl.constexpr,
               SPLIT: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
               FP32_DOT: tl.constexpr):
    """One query tile against the program's key tile. ``*_own``: the head-dim columns ``offs_c``
    (``q_col`` in the descriptor's view) whose dK/dV (and dQ) this program accumulates;
    ``*_oth`` (only when ``SPLIT``): the other columns, needed for the full-width scores and dP."""
    rows = row0 + offs_m
    row_ok = rows < seqlen
    q = _load_rows(Q, q_base, stride_qt, start, row0, q_col, offs_m, offs_c, seqlen, MASK, TMA)
    do = _load_rows(DO, do_base, stride_dot, start, row0, q_col, offs_m, offs_c, seqlen, MASK, TMA)
    if MASK:
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        delta = tl.load(delta_base + rows)
    # Transposed scores and dP: [BLOCK_N keys, BLOCK_M queries].
    st = _dot(k_own, tl.trans(q), FP32_DOT)
    dpt = _dot(v_own, tl.trans(do), FP32_DOT)
    if SPLIT:
        q_x = _load_rows(Q, q_base, stride_qt, start, row0, o_col, offs_m, offs_o, seqlen, MASK,
                         TMA)
        do_x = _load_rows(DO, do_base, stride_dot, start, row0, o_col, offs_m, offs_o, seqlen,
                          MASK, TMA)
        st += _dot(k_oth, tl.trans(q_x), FP32_DOT)
        dpt += _dot(v_oth, tl.trans(do_x), FP32_DOT)
    pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    if MASK:
        keep = (rows[None, :] < seqlen) & ((causal == 0) | (offs_n[:, None] <= rows[None, :]))
        pt = tl.where(keep, pt, 0.0)
    dv += _dot(pt.to(do.dtype), do, FP32_DOT)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += _dot(dst, q, FP32_DOT)
    if ATOMIC_DQ:
        # The fifth matmul: this key tile's share of dQ, added in fp32 (unscaled).
        dq = _dot(tl.trans(dst), k_own, FP32_DOT)
        dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_c[None, :]
        if MASK:
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA, cu_seqlens,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    n_docs, n_tokens, packed, group, causal, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED_STAGES: tl.constexpr, ATOMIC_DQ: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr,
):
    """dK, dV of one key tile, head-dim columns ``[c0, c0 + D_SPLIT)``, of one KV head, summed
    over the ``group`` query heads sharing it. Needs DELTA (from the dQ kernel or
    ``attn_bwd_delta_kernel``). Grid: (key tiles, KV heads * HEAD_DIM // D_SPLIT).

    ``ATOMIC_DQ=False``: the deterministic path (dQ comes from its own kernel; ``DQ`` unused).
    ``ATOMIC_DQ=True``: the 5-matmul backward; this key tile's share of dQ is added with fp32
    atomics into ``DQ`` (fp32, zeroed, unscaled: the caller multiplies by the softmax scale).
    ``TMA``: Q and dO are tensor descriptors with blocks [BLOCK_M, D_SPLIT]."""
    doc, start, seqlen, n0 = _locate_tile(cu_seqlens, n_docs, BLOCK_N)
    if n0 < seqlen:
        n_split: tl.constexpr = HEAD_DIM // D_SPLIT
        SPLIT: tl.constexpr = n_split > 1
        hk = tl.program_id(1) // n_split
        c0 = (tl.program_id(1) % n_split) * D_SPLIT
        tok0 = (start * packed).to(tl.int64)
        d64 = doc.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_c = c0 + tl.arange(0, D_SPLIT)  # columns owned (two halves at most: see SPLIT)
        offs_o = (D_SPLIT - c0) + tl.arange(0, D_SPLIT)
        col_ok = offs_n[:, None] < seqlen
        k_base = K + tok0 * stride_kt + d64 * stride_kb + hk * stride_kh \
            + offs_n[:, None] * stride_kt
        v_base = V + tok0 * stride_vt + d64 * stride_vb + hk * stride_vh \
            + offs_n[:, None] * stride_vt
        k_own = tl.load(k_base + offs_c[None, :], mask=col_ok, other=0.0)
        v_own = tl.load(v_base + offs_c[None, :], mask=col_ok, other=0.0)
        k_oth = k_own
        v_oth = v_own
        if SPLIT:
            k_oth = tl.load(k_base + offs_o[None, :], mask=col_ok, other=0.0)
            v_oth = tl.load(v_base + offs_o[None, :], mask=col_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, D_SPLIT], tl.float32)
        dv = tl.zeros([BLOCK_N, D_SPLIT], tl.float32)
        # Query rows: [lo, diag) cross the diagonal (masked), [diag, full) need no mask,
        # [full, seqlen) is the ragged end of the document (masked). The masked loops are short
        # (cdiv(BLOCK_N, BLOCK_M) tiles, then at most one): MASKED_STAGES=1 leaves them
        # unpipelined, which on some tiles frees the registers the pipelined main loop needs.
        lo = n0 * 0
        diag = n0 * 0
        if causal != 0:
            lo = n0
            diag = n0 + tl.cdiv(BLOCK_N, BLOCK_M) * BLOCK_M
        full = diag + tl.maximum(seqlen - diag, 0) // BLOCK_M * BLOCK_M
        for g in range(0, group):
            h = hk * group + g
            q_base = _head_base(Q, tok0, d64, h, stride_qb, stride_qt, stride_qh, TMA)
            do_base = _head_base(DO, tok0, d64, h, stride_dob, stride_dot, stride_doh, TMA)
            q_col = h * HEAD_DIM + c0
            o_col = h * HEAD_DIM + (D_SPLIT - c0)
            dq_base = DQ + tok0 * stride_dqt + d64 * stride_dqb + h * stride_dqh
            lse_base = LSE + h.to(tl.int64) * n_tokens + start
            delta_base = DELTA + h.to(tl.int64) * n_tokens + start
            for row0 in tl.range(lo, diag, BLOCK_M, num_stages=MASKED_STAGES):
                dk, dv = _dkdv_tile(dk, dv, k_own, v_own, k_oth, v_oth, Q, DO, q_base, do_base,
                                    lse_base, delta_base, dq_base, stride_qt, stride_dot,
                                    stride_dqt, start, q_col, o_col, offs_m, offs_n, offs_c,
                                    offs_o, row0, seqlen, causal, qk_scale, True, SPLIT,
                                    ATOMIC_DQ, TMA, FP32_DOT)
            for row0 in range(diag, full, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k_own, v_own, k_oth, v_oth, Q, DO, q_base, do_base,
                                    lse_base, delta_base, dq_base, stride_qt, stride_dot,
                                    stride_dqt, start, q_col, o_col, offs_m, offs_n, offs_c,
                                    offs_o, row0, seqlen, causal, qk_scale, False, SPLIT,
                                    ATOMIC_DQ, TMA, FP32_DOT)
            for row0 in tl.range(full, seqlen, BLOCK_M, num_stages=MASKED_STAGES):
                dk, dv = _dkdv_tile(dk, dv, k_own, v_own, k_oth, v_oth, Q, DO, q_base, do_base,
                                    lse_base, delta_base, dq_base, stride_qt, stride_dot,
                                    stride_dqt, start, q_col, o_col, offs_m, offs_n, offs_c,
                                    offs_o, row0, seqlen, causal, qk_scale, True, SPLIT,
                                    ATOMIC_DQ, TMA, FP32_DOT)
        tl.store(DK + tok0 * stride_dkt + d64 * stride_dkb + hk * stride_dkh
                 + offs_n[:, None] * stride_dkt + offs_c[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
        tl.store(DV + tok0 * stride_dvt + d64 * stride_dvb + hk * stride_dvh
                 + offs_n[:, None] * stride_dvt + offs_c[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA, cu_seqlens,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    n_docs, n_tokens, packed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DELTA[h, row] = rowsum(dO * O) in fp32 for one row tile of one query head."""
    doc, start, seqlen, m0 = _locate_tile(cu_seqlens, n_docs, BLOCK_M)
    if m0 < seqlen:
        h = tl.program_id(1)
        tok0 = (start * packed).to(tl.int64)
        d64 = doc.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m[:, None] < seqlen
        o = tl.load(O + tok0 * stride_ot + d64 * stride_ob + h * stride_oh
                    + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok, other=0.0)
        do = tl.load(DO + tok0 * stride_dot + d64 * stride_dob + h * stride_doh
                     + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h.to(tl.int64) * n_tokens + start + offs_m, delta, mask=offs_m < seqlen)
