"""Memory traffic of the Triton kernels, counted under the interpreter on small shapes.

``python -m a1_kernels.traffic`` (with ``TRITON_INTERPRET=1``) prints one JSON list of rows
``{kernel, shape, bytes, min_bytes, ratio, goal, met, note}``; ``tools/kernel_report.py`` shows
them. Bytes are counted by ``aot_common.count_traffic`` from every ``tl.load``/``tl.store`` the
kernel executes (masked-off lanes excluded), attributed to the named tensors by address.

Minimums:
* SVA top-k: the teacher's row read once, the k keys (int64) written once, the row index read.
  Goal (issue 11): at most 1.5x.
* SVA set-loss: the [R, k] fp32 student and teacher logits read once, loss [R] and the [R, k]
  coefficients written once. Goal: at most 1.5x.
* Attention (flash style): per query block, every K/V row the block can see (causal) read once;
  per key block of dK/dV, every visible Q/dO row of the group's heads read once; the outputs
  written once and nothing else stored (scores never materialised in global memory). Goal: 1.0x
  and no bytes written outside the outputs.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .aot_common import count_traffic

ATTN_DOCS = (37, 64, 19)  # ragged: not multiples of the 16-row interpreter tiles
ATTN_HEADS = (4, 2)  # query heads, KV heads (GQA group 2)
ATTN_DIM = 32


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _row(kernel, shape, moved, minimum, goal, note, extra_ok=True):
    ratio = moved / minimum
    return {"kernel": kernel, "shape": shape, "bytes": int(moved), "min_bytes": int(minimum),
            "ratio": ratio, "goal": f"<= {goal}x" if goal != float("inf") else "(info)", "met": bool(ratio <= goal + 1e-9 and extra_ok),
            "note": note}


def _visible_rows(lens, block, kind):
    """Σ over blocks of the rows the other operand contributes (causal), per head."""
    total = 0
    for n in lens:
        for b0 in range(0, n, block):
            total += min(n, b0 + block) if kind == "query" else n - b0
    return total


def attention_rows() -> list[dict]:
    from .attention import ops

    hq, hk = ATTN_HEADS
    d, dtype = ATTN_DIM, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lens = list(ATTN_DOCS)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out, lse = torch.zeros_like(q), torch.zeros(hq, t)
    do = torch.randn(t, hq, d, generator=g).to(dtype)
    dq, dk, dv, delta = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros(hq, t)
    scale = 1 / math.sqrt(d)
    common = (len(lens), t, 1, hq // hk, 1, scale * math.log2(math.e))
    st = ops._strides
    shape = f"docs {lens}, Hq {hq}, Hkv {hk}, D {d}, bf16, tiles {ops.INTERPRET_TILES}"
    bm, bn = ops.INTERPRET_TILES
    e = q.element_size()
    names = dict(Q=q, K=k, V=v, O=out, LSE=lse, DO=do, DQ=dq, DK=dk, DV=dv, DELTA=delta, cu=cu)
    rows = []

    with count_traffic(names) as fwd:
        ops._launch("fwd", t, hq, (q, k, v, out, lse, cu, *st(q), *st(k), *st(v), *st(out),
                                   *common), d, dtype, len(lens))
    with count_traffic(names) as bdq:
        ops._launch("bwd_dq", t, hq, (q, k, v, out, do, dq, lse, delta, cu, *st(q), *st(k), *st(v),
                                      *st(out), *st(do), *st(dq), *common, scale), d, dtype, len(lens))
    with count_traffic(names) as bkv:
        ops._launch("bwd_dkdv", t, hk, (q, k, v, do, dk, dv, dk, lse, delta, cu, *st(q), *st(k),
                                        *st(v), *st(do), *st(dk), *st(dv), 0, 0, 0, *common,
                                        scale), d, dtype, len(lens))

    def dup(tr, tensors):  # bytes re-read by the same program
        return sum(p[n][0] - p[n][1] for p in tr.per_program.values() for n in tensors if n in p)

    kv_min = 2 * hq * _visible_rows(lens, bm, "query") * d * e
    for name, tr, outs in (("attention_fwd", fwd, {"O", "LSE"}), ("attention_bwd_dq", bdq, {"DQ", "DELTA"})):
        kv = tr.read.get("K", 0) + tr.read.get("V", 0)
        stray = sum(b for n, b in tr.written.items() if n not in outs) + tr.unknown
        rows.append(_row(name + " K/V per query block", shape, kv, kv_min, 1.0,
                         f"re-read within a block: {dup(tr, {'K', 'V'})} B; bytes stored outside "
                         f"{sorted(outs)}: {stray} (scores never in global memory)",
                         extra_ok=dup(tr, {"K", "V"}) == 0 and stray == 0))
    qdo_min = 2 * hq * _visible_rows(lens, bn, "key") * d * e  # each KV head reads its group's heads
    qdo = bkv.read.get("Q", 0) + bkv.read.get("DO", 0)
    stray = sum(b for n, b in bkv.written.items() if n not in {"DK", "DV"}) + bkv.unknown
    rows.append(_row("attention_bwd_dkdv Q/dO per key block", shape, qdo, qdo_min, 1.0,
                     f"re-read within a block: {dup(bkv, {'Q', 'DO'})} B; bytes stored outside "
                     f"dK/dV: {stray}", extra_ok=dup(bkv, {"Q", "DO"}) == 0 and stray == 0))
    # Whole-kernel totals against the compulsory minimum (every tensor once): how much the
    # per-block K/V re-reads cost at this small shape (it grows with document length / BLOCK_M).
    fwd_min = sum(_nbytes(x) for x in (q, k, v, out, lse))
    rows.append(_row("attention_fwd total", shape, fwd.total(), fwd_min, float("inf"),
                     "information: flash attention re-reads K/V once per query block"))
    return rows


def sva_rows() -> list[dict]:
    from .sva import sva as sva_mod

    rows = []
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 8, 5000, 64
    for dtype in (torch.bfloat16, torch.float32):
        teacher = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
        rows_idx = torch.arange(n, dtype=torch.int32)
        with count_traffic({"teacher": teacher, "rows": rows_idx}) as tr:
            keys = sva_mod.sva_topk_keys(teacher, rows_idx, k, vocab, 0)
        # keys is allocated by the launcher: every byte outside the named inputs is its write.
        moved = tr.total()
        minimum = _nbytes(teacher) + _nbytes(keys) + _nbytes(rows_idx)
        rows.append(_row("_sva_topk_kernel", f"N {n}, V {vocab}, k {k}, "
                         f"{str(dtype).split('.')[-1]}, BLOCK_V "
                         f"{sva_mod.INTERPRET_TOPK_CONFIG['BLOCK_V']}", moved, minimum, 1.5,
                         f"teacher read {tr.read.get('teacher', 0)} B "
                         f"(unique {tr.read_unique.get('teacher', 0)})"))
    s = torch.randn(n * 4, k, generator=g)
    t = torch.randn(n * 4, k, generator=g)
    with count_traffic({"student": s, "teacher": t}) as tr:
        loss, coef = sva_mod.sva_set_loss(s, t)
    minimum = _nbytes(s) + _nbytes(t) + _nbytes(loss) + _nbytes(coef)
    rows.append(_row("_sva_set_loss_kernel", f"R {n * 4}, k {k}, fp32", tr.total(), minimum, 1.5,
                     "[R, k] logits in, loss and coefficients out"))
    return rows


def measure() -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1 (set before the kernels are imported)")
    return attention_rows() + sva_rows()


if __name__ == "__main__":
    print(json.dumps(measure()))
