"""Every (kernel, launch config) of the fused cross-entropy at the 35B-A3B shapes, for
ahead-of-time compilation (``a1_kernels.aot_common``, ``tools/kernel_report.py``).

``launch_specs()`` returns one dict per (kernel, logits dtype, TP size) with the keys ``kernel``,
``fn``, ``signature``, ``constexprs``, ``num_warps``, ``num_stages``, ``config`` and ``shape``
(``flops``/``min_bytes`` of one launch over one chunk of ``CHUNK_TOKENS`` rows: the stats kernel
reads the chunk once, the gradient kernel reads and writes it once). The TP size only changes
runtime arguments (V_local), so specs differing by it compile once.
"""
from __future__ import annotations

from .kernels import GPU_CONFIG, _ce_grad_kernel, _ce_stats_kernel

VOCAB = 248_320
HIDDEN = 2048
TP_SIZES = (1, 2, 4, 8)
CHUNK_TOKENS = 4096
_TRITON_DTYPE = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
# fp32 operations per logit: stats (sub, exp, add, max), gradient (sub, exp, sub, mul, cast)
_FLOPS_PER_LOGIT = {"_ce_stats_kernel": 4, "_ce_grad_kernel": 5}


def launch_specs() -> list[dict]:
    cfg = GPU_CONFIG
    consts = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_V": cfg["BLOCK_V"]}
    specs = []
    for kernel, fn in (("_ce_stats_kernel", _ce_stats_kernel),
                       ("_ce_grad_kernel", _ce_grad_kernel)):
        for dtype, (ptr, elem) in _TRITON_DTYPE.items():
            if kernel == "_ce_stats_kernel":
                signature = {"z_ptr": ptr, "stride_z": "i32", "tgt_ptr": "*i32",
                             "max_ptr": "*fp32", "sum_ptr": "*fp32", "tlogit_ptr": "*fp32"}
            else:
                signature = {"z_ptr": ptr, "stride_z": "i32", "tgt_ptr": "*i32",
                             "lse_ptr": "*fp32", "g_ptr": "*fp32"}
            signature.update({"n_rows": "i32", "n_cols": "i32", "BLOCK_R": "constexpr",
                              "BLOCK_V": "constexpr"})
            constexprs = dict(consts)
            if kernel == "_ce_grad_kernel":  # hand rounding is for the interpreter only
                signature["RNE_BF16"] = "constexpr"
                constexprs["RNE_BF16"] = False
            for tp in TP_SIZES:
                v_local = VOCAB // tp
                passes = 1 if kernel == "_ce_stats_kernel" else 2  # read; read + write in place
                specs.append({
                    "kernel": kernel,
                    "fn": fn,
                    "signature": signature,
                    "constexprs": constexprs,
                    "num_warps": cfg["num_warps"],
                    "num_stages": cfg["num_stages"],
                    "config": (f"{dtype} BLOCK_R={cfg['BLOCK_R']} BLOCK_V={cfg['BLOCK_V']} "
                               f"warps={cfg['num_warps']} tp={tp}"),
                    "shape": {"vocab": VOCAB, "tp": tp, "v_local": v_local, "hidden": HIDDEN,
                              "rows": CHUNK_TOKENS, "dtype": dtype, "math": "fp32",
                              "flops": CHUNK_TOKENS * v_local * _FLOPS_PER_LOGIT[kernel],
                              "min_bytes": CHUNK_TOKENS * (passes * v_local * elem + 16)},
                })
    return specs
