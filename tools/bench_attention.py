"""Packed (varlen) attention: ours vs SDPA per document, FlexAttention, flash-attn 2/3, cuDNN.

    python tools/bench_attention.py --smoke                      # CPU: tiny shapes, interpreter
    python tools/bench_attention.py --csv bench.csv              # GPU: packs of 16K..128K tokens

Packs mix many short tool-use documents with a few long trajectories (the Agents-A1 corpus
averages ~45K tokens per trajectory). FLOPs are the causal FLOPs counted per document:
forward ``4 * D * Hq * sum L(L+1)/2``, backward 2.5x the forward (flash-attention's convention).
Implementations that are not installed or fail on a shape become rows with the error.
Rows: ``ours`` (the default, deterministic 7-matmul backward; TMA loads on sm_90+),
``ours_no_tma`` (the same with pointer loads, cp.async: ``A1_ATTENTION_TMA=0``),
``ours_atomic_dq`` (5-matmul backward, dQ by fp32 atomics), ``sdpa_loop``, ``flex``, ``flash_attn`` (flash-attn 2),
``flash_attn3`` (flash-attn 3's Hopper build, ``flash_attn_interface``), ``cudnn`` (Transformer
Engine's DotProductAttention on its cuDNN fused-attention backend).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch.nn.functional as F  # noqa: E402

from a1_kernels.attention import packed_attention  # noqa: E402
from a1_kernels.attention.ops import TMA_ENV  # noqa: E402
from megatron_a1.benchmarking import Bench  # noqa: E402


def length_mix(tokens: int, seed: int = 0, long_fraction: float = 0.6) -> list[int]:
    """Document lengths filling ``tokens``: ~``long_fraction`` in a few long documents (up to
    45K tokens) and the rest in many short ones (64..4K tokens)."""
    rng = random.Random(seed)
    lens, left = [], tokens
    long_budget = int(tokens * long_fraction)
    while long_budget > tokens // 16:
        n = min(long_budget, rng.randint(min(tokens // 4, 45056) // 2, min(tokens // 2, 45056)))
        lens.append(n)
        long_budget -= n
        left -= n
    while left > 0:
        n = min(left, int(rng.lognormvariate(6.5, 1.0)) + 64, 4096)
        lens.append(n)
        left -= n
    rng.shuffle(lens)
    return lens


def causal_flops(lens: list[int], hq: int, d: int) -> float:
    return 4.0 * d * hq * sum(n * (n + 1) / 2 for n in lens)


def _sdpa_loop(q, k, v, lens):
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
            is_causal=True, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _flex(q, k, v, lens):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device),
                                  torch.tensor(lens, device=q.device))

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    t = q.shape[0]
    block_mask = create_block_mask(mask_mod, 1, 1, t, t, device=q.device)
    fn = torch.compile(flex_attention) if q.is_cuda else flex_attention

    def run(q, k, v):
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)
    return run


def _flash_attn(q, k, v, cu, max_len):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def _flash_attn3(q, k, v, cu, max_len):
    from flash_attn_interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    return out[0] if isinstance(out, tuple) else out  # some releases also return the LSE


def _cudnn(q, k, v, cu, max_len):
    """Transformer Engine's attention forced onto cuDNN (its "fused attention" backend)."""
    os.environ["NVTE_FLASH_ATTN"], os.environ["NVTE_FUSED_ATTN"] = "0", "1"
    import transformer_engine.pytorch as te

    attn = te.DotProductAttention(q.shape[1], q.shape[2], num_gqa_groups=k.shape[1],
                                  attention_dropout=0.0, qkv_format="thd",
                                  attn_mask_type="padding_causal")

    def run(q, k, v):
        out = attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                   max_seqlen_kv=max_len)
        return out.view(q.shape)
    return run


@contextlib.contextmanager
def _tma_mode(mode: str | None):
    """Sets ``A1_ATTENTION_TMA`` for a forward and its backward (None: leave it)."""
    old = os.environ.get(TMA_ENV)
    if mode is not None:
        os.environ[TMA_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TMA_ENV, None)
        else:
            os.environ[TMA_ENV] = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (not a performance figure)")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 256])
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--impls", nargs="+", default=["ours", "ours_no_tma", "ours_atomic_dq",
                                                  "sdpa_loop", "flex", "flash_attn",
                                                  "flash_attn3", "cudnn"])
    p.add_argument("--csv", help="append the rows to this CSV file")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.tokens, args.head_dims, args.q_heads, args.kv_heads = [64], [32], 4, 1
        dtype = torch.float32 if device == "cpu" else dtype
    bench = Bench("packed attention", smoke=args.smoke)
    for tokens in args.tokens:
        lens = length_mix(tokens) if not args.smoke else [30, 7, 1, 26]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                          device=device)
        for d in args.head_dims:
            gen = torch.Generator(device).manual_seed(0)
            q = torch.randn(tokens, args.q_heads, d, device=device, dtype=dtype, generator=gen)
            k = torch.randn(tokens, args.kv_heads, d, device=device, dtype=dtype, generator=gen)
            v = torch.randn_like(k)
            do = torch.randn_like(q)
            fwd_flops = causal_flops(lens, args.q_heads, d)
            impls = {
                "ours": lambda q, k, v: packed_attention(q, k, v, cu, max(lens)),
                "ours_no_tma": lambda q, k, v: packed_attention(q, k, v, cu, max(lens)),
                "ours_atomic_dq": lambda q, k, v: packed_attention(q, k, v, cu, max(lens),
                                                                   deterministic=False),
                "sdpa_loop": lambda q, k, v: _sdpa_loop(q, k, v, lens),
                "flex": lambda q, k, v: _flex(q, k, v, lens)(q, k, v),
                "flash_attn": lambda q, k, v: _flash_attn(q, k, v, cu, max(lens)),
                "flash_attn3": lambda q, k, v: _flash_attn3(q, k, v, cu, max(lens)),
                "cudnn": lambda q, k, v: _cudnn(q, k, v, cu, max(lens))(q, k, v),
            }
            for name in args.impls:
                fn = impls[name]
                case = {"tokens": tokens, "docs": len(lens), "max_doc": max(lens), "D": d,
                        "heads": f"{args.q_heads}:{args.kv_heads}", "dtype": str(dtype)[6:]}
                # Build the block mask / the TE module once, outside the timed region.
                setup = {"flex": lambda: _flex(q, k, v, lens),
                         "cudnn": lambda: _cudnn(q, k, v, cu, max(lens))}
                if name in setup:
                    try:
                        run = setup[name]()
                        fn = lambda q, k, v, run=run: run(q, k, v)  # noqa: E731
                    except Exception:  # noqa: BLE001 - timed call reports the error
                        pass
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                def fwd_bwd(fn=fn, qg=qg, kg=kg, vg=vg):
                    torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)
                with _tma_mode("0" if name == "ours_no_tma" else None):
                    bench.run(name, {**case, "pass": "fwd"}, lambda: fn(q, k, v), flops=fwd_flops)
                    bench.run(name, {**case, "pass": "fwd+bwd"}, fwd_bwd, flops=3.5 * fwd_flops)
    bench.report(csv_path=args.csv)


if __name__ == "__main__":
    main()
