"""Every (kernel, config) the packed-attention launchers can pick, for ahead-of-time compilation.

``launch_specs()`` lists them at the Qwen3.5-35B-A3B shapes (16 query heads, 2 KV heads, packs of
131,072 tokens made of ~45K-token documents) for head dims 64/128/256 and bf16/fp16/fp32;
``compile_spec(spec, arch)`` compiles one for a GPU target with no GPU present (run it without
``TRITON_INTERPRET``). ``tools/kernel_report.py`` and ``tests/test_attention_compile.py`` use both.
Each spec is specialised as Triton's launcher specialises the model's launch (a causal THD pack:
``packed`` and ``causal`` are 1, hence constants; aligned tensors and 16-divisible strides and
sizes carry ``tt.divisibility``), so the report shows the code that runs. ``archs``: the GPUs
whose launcher picks the tile (``ops.HOPPER_CONFIGS`` differ from sm_80's). On sm_90+ a bf16/fp16
kernel with ``ops.TMA_CONFIGS`` is listed twice: with its operands as TMA descriptors (what the
model's contiguous THD packs get) and as pointers (the fallback for tensors a descriptor cannot
address).
"""
from __future__ import annotations

import torch

from ..aot_common import launch_specialization
from .ops import KERNELS, TMA_OPERANDS, configs_for, has_tma_tiles, kernel_constants, tma_block

MODEL_SHAPE = {"tokens": 131072, "q_heads": 16, "kv_heads": 2,
               "doc_lens": [45056, 45056, 40960], "causal": True}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}


def _launch_values(kernel: str, head_dim: int, dtype: torch.dtype, consts: dict) -> dict:
    """The arguments ``ops`` passes at MODEL_SHAPE for a THD pack (causal), as stand-ins: what
    Triton's launcher specialises on (``aot_common.launch_specialization``: dtypes, 16-byte
    alignment, 16-divisible ints, and ints equal to 1, here ``packed`` and ``causal``, which
    become constants; a TMA descriptor's dtype and block shape)."""
    from triton.tools.ragged_tma import create_ragged_descriptor

    fn = KERNELS[kernel]
    s = MODEL_SHAPE
    values = {}
    for name in fn.arg_names:
        if consts.get("TMA") and name in TMA_OPERANDS[kernel]:
            # A ragged descriptor (ops.tma_descriptor) over the [tokens, heads * D] view.
            heads = s["kv_heads"] if name in ("K", "V") else s["q_heads"]
            view = torch.empty((s["tokens"], heads * head_dim), dtype=dtype, device="meta")
            desc = create_ragged_descriptor(view, tma_block(kernel, name, consts))
            desc.base = torch.empty(0, dtype=dtype)  # what the specialisation reads: dtype
            values[name] = desc
        elif name in _TENSORS:
            fp32 = name == "DQ" and kernel == "bwd"  # the fp32 buffer dQ is added into
            values[name] = torch.empty(0, dtype=torch.float32 if fp32 else dtype)
        elif name in ("LSE", "DELTA"):
            values[name] = torch.empty(0, dtype=torch.float32)
        elif name == "cu_seqlens":
            values[name] = torch.empty(0, dtype=torch.int32)
        elif name.startswith("stride_"):  # [T, H, D]: (batch 0, token H * D, head D)
            heads = s["kv_heads"] if name[7] in "kv" or name[7:9] in ("dk", "dv") else s["q_heads"]
            values[name] = {"b": 0, "t": heads * head_dim, "h": head_dim}[name[-1]]
        elif name in ("qk_scale", "sm_scale"):
            values[name] = 0.0625
        else:
            values[name] = {"n_docs": len(s["doc_lens"]), "n_tokens": s["tokens"], "packed": 1,
                            "group": s["q_heads"] // s["kv_heads"],
                            "causal": int(s["causal"])}.get(name)
    return values


def _work(kernel: str, head_dim: int, dtype: str) -> tuple[float, float]:
    """(flops, minimum bytes) of one launch at MODEL_SHAPE (causal FLOPs counted per document)."""
    s = MODEL_SHAPE
    pairs = sum(n * (n + 1) / 2 for n in s["doc_lens"])  # visible (query, key) pairs per head
    # Useful matmuls (the head-dim split of "bwd"/"bwd_dkdv" at 256 recomputes S and dP).
    matmuls = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": 4, "bwd": 5, "bwd_delta": 0}[kernel]
    flops = 2.0 * matmuls * pairs * head_dim * s["q_heads"]
    e = _ELEM_BYTES[dtype]
    q_like = s["tokens"] * s["q_heads"] * head_dim * e
    kv_like = s["tokens"] * s["kv_heads"] * head_dim * e
    rows = s["tokens"] * s["q_heads"] * 4
    bytes_ = {
        "fwd": 2 * q_like + 2 * kv_like + rows,                 # q, k, v read; o, lse written
        "bwd_dq": 4 * q_like + 2 * kv_like + 2 * rows,          # q, o, do, k, v, lse; dq, delta
        "bwd_dkdv": 2 * q_like + 4 * kv_like + 2 * rows,        # q, do, k, v, lse, delta; dk, dv
        # q, do, k, v, lse, delta; dk, dv; dq in fp32 (added once per visible key tile: the
        # minimum counts one read-modify-write)
        "bwd": 2 * q_like + 4 * kv_like + 2 * rows + 2 * q_like * 4 // e,
        "bwd_delta": 2 * q_like + rows,                         # o, do; delta
    }[kernel]
    return flops, float(bytes_)


def _tiles(kernel: str, head_dim: int, dtype: torch.dtype) -> list[tuple]:
    """(tile, archs it is launched on, TMA): sm_80's list, sm_90/sm_100's where it differs, and
    sm_90/sm_100's TMA tiles (bf16/fp16)."""
    base = configs_for(kernel, head_dim, dtype, 80)
    hopper = configs_for(kernel, head_dim, dtype, 90)
    tiles = [(c, (80, 90, 100), False) for c in base] if hopper == base else \
        [(c, (80,), False) for c in base] + [(c, (90, 100), False) for c in hopper]
    if has_tma_tiles(kernel, head_dim, dtype):
        tiles += [(c, (90, 100), True) for c in configs_for(kernel, head_dim, dtype, 90, True)]
    return tiles


def launch_specs() -> list[dict]:
    """One dict per (kernel, head dim, dtype, tile config) the launchers can pick on a GPU."""
    specs = []
    for kernel, fn in KERNELS.items():
        for head_dim in (64, 128, 256):
            for torch_dtype, dtype in _TYPES.items():
                flops, min_bytes = _work(kernel, head_dim, dtype)
                for cfg, archs, tma in _tiles(kernel, head_dim, torch_dtype):
                    consts = kernel_constants(kernel, cfg, head_dim, torch_dtype, tma)
                    signature, constexprs, attrs = launch_specialization(fn, {
                        **_launch_values(kernel, head_dim, torch_dtype, consts), **consts})
                    specs.append({
                        "kernel": f"attention_{kernel}",
                        "fn": fn,
                        "signature": signature,
                        "constexprs": constexprs,
                        "attrs": attrs,
                        "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages,
                        "config": f"d{head_dim}-{dtype}-{cfg.text()}{'-tma' if tma else ''}",
                        "has_dot": kernel != "bwd_delta",
                        "archs": archs,  # the GPUs (sm_<arch>) whose launcher picks this tile
                        "shape": dict(MODEL_SHAPE, head_dim=head_dim, dtype=dtype,
                                      math="tf32x3" if dtype == "fp32" else dtype,
                                      flops=flops, min_bytes=min_bytes),
                    })
    return specs


def compile_spec(spec: dict, arch: int):
    """Compile one spec for ``sm_<arch>`` (80, 90, 100) with no GPU; returns Triton's kernel."""
    from ..aot_common import compile_spec as _compile

    return _compile(spec, arch)
