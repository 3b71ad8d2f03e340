"""Every (kernel, launch config) the SVA launchers can pick at the 35B-A3B shapes, for the
ahead-of-time compilation and roofline report.

``launch_specs()`` returns one dict per (kernel, config, dtype, k, TP size) with the keys
``kernel``, ``fn`` (the ``@triton.jit`` function), ``signature`` (arg → Triton type), ``constexprs``,
``num_warps``, ``num_stages``, ``config`` (short text) and ``shape`` (model shape plus ``flops`` and
``min_bytes`` of one launch: teacher row read once, k keys written; the set-loss kernel reads
2·k fp32 and writes k + 1). Rows per launch: one fused-linear chunk (``CHUNK_TOKENS``) — the
logits-level path launches the same kernel over all rows of the batch.
"""
from __future__ import annotations

import torch

from ..aot_common import launch_specialization
from .sva import (SET_LOSS_CONFIG, _pow2, _sva_set_loss_kernel, _sva_topk_kernel, _topk_configs,
                  SORT_MIN)

VOCAB = 248_320
HIDDEN = 2048
TP_SIZES = (1, 2, 4, 8)
TOPKS = (32, 64, 256)
CHUNK_TOKENS = 4096
_TRITON_DTYPE = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}
_GPU_SORT_MIN = 16  # the value the launcher uses on a GPU (sva.SORT_MIN differs when interpreting)


def _tensor(dtype: torch.dtype) -> torch.Tensor:
    """A stand-in argument: the launcher looks only at the dtype and the (aligned) address."""
    return torch.empty(0, dtype=dtype)


def launch_specs() -> list[dict]:
    specs = []
    for dtype, (ptr, elem) in _TRITON_DTYPE.items():
        for k in TOPKS:
            kp = _pow2(k)
            for cfg in _topk_configs(kp):
                block_v = cfg.kwargs["BLOCK_V"]
                for tp in TP_SIZES:
                    v_local = VOCAB // tp
                    # What rank 0's launch passes (sva_topk_keys): contiguous [rows, v_local]
                    # logits, its whole shard valid, offset 0. The launcher's alignment hints
                    # (16-divisible strides and sizes, aligned tensors) come with them.
                    signature, constexprs, attrs = launch_specialization(_sva_topk_kernel, {
                        "t_ptr": _tensor(_TORCH_DTYPE[dtype]), "stride_t": v_local,
                        "row_ptr": _tensor(torch.int32), "keys_ptr": _tensor(torch.int64),
                        "n_valid": v_local, "vocab_offset": 0, "K": k, "KP": kp,
                        "BLOCK_V": block_v, "SORT_MIN": min(_GPU_SORT_MIN, kp)})
                    assert signature["t_ptr"] == ptr
                    specs.append({
                        "kernel": "_sva_topk_kernel",
                        "fn": _sva_topk_kernel,
                        "signature": signature,
                        "constexprs": constexprs,
                        "attrs": attrs,
                        "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages,
                        "config": f"{dtype} k={k} BLOCK_V={block_v} warps={cfg.num_warps} tp={tp}",
                        "shape": {"vocab": VOCAB, "tp": tp, "v_local": v_local, "k": k,
                                  "hidden": HIDDEN, "rows": CHUNK_TOKENS, "dtype": dtype, "math": "fp32",
                                  "flops": 0,  # comparisons only; bandwidth bound
                                  "min_bytes": CHUNK_TOKENS * (v_local * elem + k * 8 + 4)},
                    })
        # set-loss: one config, dtype independent (fp32 [R, k] in and out); listed once per k.
    for k in TOPKS:
        kp = _pow2(k)
        signature, constexprs, attrs = launch_specialization(_sva_set_loss_kernel, {
            "s_ptr": _tensor(torch.float32), "t_ptr": _tensor(torch.float32),
            "loss_ptr": _tensor(torch.float32), "coef_ptr": _tensor(torch.float32),
            "n_rows": CHUNK_TOKENS, "K": k, "KP": kp, "BLOCK_R": SET_LOSS_CONFIG["BLOCK_R"]})
        specs.append({
            "kernel": "_sva_set_loss_kernel",
            "fn": _sva_set_loss_kernel,
            "signature": signature,
            "constexprs": constexprs,
            "attrs": attrs,
            "num_warps": SET_LOSS_CONFIG["num_warps"],
            "num_stages": SET_LOSS_CONFIG["num_stages"],
            "config": f"k={k} BLOCK_R={SET_LOSS_CONFIG['BLOCK_R']}",
            "shape": {"k": k, "rows": CHUNK_TOKENS, "dtype": "fp32", "math": "fp32", "flops": CHUNK_TOKENS * k * 12,
                      "min_bytes": CHUNK_TOKENS * (3 * k * 4 + 4)},
        })
    return specs


del SORT_MIN
