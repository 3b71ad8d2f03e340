"""Every (kernel, config) the packed-attention launchers can pick, for ahead-of-time compilation.

``launch_specs()`` lists them at the Qwen3.5-35B-A3B shapes (16 query heads, 2 KV heads, packs of
131,072 tokens made of ~45K-token documents) for head dims 64/128/256 and bf16/fp16/fp32;
``compile_spec(spec, arch)`` compiles one for a GPU target with no GPU present (run it without
``TRITON_INTERPRET``). ``tools/kernel_report.py`` and ``tests/test_attention_compile.py`` use both.
"""
from __future__ import annotations

import torch

from .ops import KERNELS, configs_for

MODEL_SHAPE = {"tokens": 131072, "q_heads": 16, "kv_heads": 2,
               "doc_lens": [45056, 45056, 40960], "causal": True}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Tensor arguments of each kernel; every other non-constexpr argument is an i32 except the scales.
_TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_PTRS = {"LSE", "DELTA"}
_SCALES = {"qk_scale", "sm_scale"}
_CONSTEXPRS = {"HEAD_DIM", "BLOCK_M", "BLOCK_N", "FP32_DOT"}


def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = "*" + dtype
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "cu_seqlens":
            sig[name] = "*i32"
        elif name in _SCALES:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility(fn) -> dict[tuple[int], list]:
    """The 16-divisibility Triton's launcher infers at run time for aligned tensors and for the
    strides (multiples of the head dim, or 0 for the batch stride of a pack)."""
    hinted = _TENSORS | _FP32_PTRS | {"cu_seqlens"}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in hinted or name.startswith("stride_")}


def _work(kernel: str, head_dim: int, dtype: str) -> tuple[float, float]:
    """(flops, minimum bytes) of one launch at MODEL_SHAPE (causal FLOPs counted per document)."""
    s = MODEL_SHAPE
    pairs = sum(n * (n + 1) / 2 for n in s["doc_lens"])  # visible (query, key) pairs per head
    matmuls = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": 4}[kernel]
    flops = 2.0 * matmuls * pairs * head_dim * s["q_heads"]
    e = _ELEM_BYTES[dtype]
    q_like = s["tokens"] * s["q_heads"] * head_dim * e
    kv_like = s["tokens"] * s["kv_heads"] * head_dim * e
    rows = s["tokens"] * s["q_heads"] * 4
    bytes_ = {
        "fwd": 2 * q_like + 2 * kv_like + rows,                 # q, k, v read; o, lse written
        "bwd_dq": 4 * q_like + 2 * kv_like + 2 * rows,          # q, o, do, k, v, lse; dq, delta
        "bwd_dkdv": 2 * q_like + 4 * kv_like + 2 * rows,        # q, do, k, v, lse, delta; dk, dv
    }[kernel]
    return flops, float(bytes_)


def launch_specs() -> list[dict]:
    """One dict per (kernel, head dim, dtype, tile config) the launchers can pick on a GPU."""
    specs = []
    for kernel, fn in KERNELS.items():
        for head_dim in (64, 128, 256):
            for torch_dtype, dtype in _TYPES.items():
                flops, min_bytes = _work(kernel, head_dim, dtype)
                for cfg in configs_for(kernel, head_dim, torch_dtype):
                    specs.append({
                        "kernel": f"attention_{kernel}",
                        "fn": fn,
                        "signature": _signature(fn, dtype),
                        "constexprs": {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m,
                                       "BLOCK_N": cfg.block_n, "FP32_DOT": dtype == "fp32"},
                        "attrs": _divisibility(fn),
                        "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages,
                        "config": f"d{head_dim}-{dtype}-{cfg.text()}",
                        "shape": dict(MODEL_SHAPE, head_dim=head_dim, dtype=dtype,
                                      math="tf32x3" if dtype == "fp32" else dtype,
                                      flops=flops, min_bytes=min_bytes),
                    })
    return specs


def compile_spec(spec: dict, arch: int):
    """Compile one spec for ``sm_<arch>`` (80, 90, 100) with no GPU; returns Triton's kernel."""
    from ..aot_common import compile_spec as _compile

    return _compile(spec, arch)
