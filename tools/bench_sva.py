"""Benchmark the SVA loss: eager reference, torch.compile'd reference, Liger-style chunked PyTorch,
and ours (logits level and fused with the LM head), forward + backward, same inputs in one run.

    python tools/bench_sva.py                 # GPU: N ∈ {4K, 16K, 64K}, V = 248,320, k ∈ {32, 64}, bf16
    python tools/bench_sva.py --smoke         # CPU-sized shapes (proves the script runs)
    python tools/bench_sva.py --csv bench.csv # also append rows with device/versions/date
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from a1_kernels.sva import fused_linear_sva, sva_loss  # noqa: E402
from a1_kernels.sva.reference import sva_loss_reference  # noqa: E402
from megatron_a1.benchmarking import Bench  # noqa: E402


def chunked_reference(student, teacher, k, chunk):
    """Liger-style: the reference loss chunk by chunk over tokens, gradients taken per chunk."""
    total = student.new_zeros((), dtype=torch.float32)
    grad = torch.zeros_like(student)
    for i in range(0, student.shape[0], chunk):
        x = student[i:i + chunk].detach().requires_grad_(True)
        loss = sva_loss_reference(x, teacher[i:i + chunk], k).sum()
        loss.backward()
        grad[i:i + chunk] = x.grad
        total += loss.detach()
    return total, grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        ns, vocab, ks, hidden, dtype, chunk = [64], 1000, [8], 64, torch.float32, 32
    else:
        ns, vocab, ks, hidden, dtype, chunk = [4096, 16384, 65536], 248_320, [32, 64], 2048, torch.bfloat16, 4096
    bench = Bench("sva", smoke=args.smoke)
    compiled_ref = torch.compile(sva_loss_reference, dynamic=False) if dev == "cuda" else None
    for n in ns:
        for k in ks:
            case = {"N": n, "V": vocab, "k": k, "dtype": str(dtype).replace("torch.", "")}
            g = torch.Generator(device=dev).manual_seed(0)
            s = torch.randn(n, vocab, device=dev, dtype=dtype, generator=g).requires_grad_(True)
            t = torch.randn(n, vocab, device=dev, dtype=dtype, generator=g)
            elem = s.element_size()
            min_bytes = 3 * n * vocab * elem  # student + teacher read, student grad written

            def fwd_bwd(fn):
                def run():
                    s.grad = None
                    fn(s, t, k).sum().backward()
                return run

            bench.run("eager reference", case, fwd_bwd(sva_loss_reference), bytes_moved=min_bytes)
            if compiled_ref is not None:
                bench.run("torch.compile reference", case, fwd_bwd(compiled_ref), bytes_moved=min_bytes)
            bench.run("chunked PyTorch (Liger-style)", case,
                      lambda: chunked_reference(s, t, k, chunk), bytes_moved=min_bytes)
            bench.run("ours: sva_loss", case, fwd_bwd(sva_loss), bytes_moved=min_bytes)
            del s, t
            hs = torch.randn(n, hidden, device=dev, dtype=dtype, generator=g).requires_grad_(True)
            ws = (torch.randn(vocab, hidden, device=dev, dtype=dtype, generator=g) * 0.02).requires_grad_(True)
            ht = torch.randn(n, hidden, device=dev, dtype=dtype, generator=g)
            wt = torch.randn(vocab, hidden, device=dev, dtype=dtype, generator=g) * 0.02

            def fused():
                hs.grad = ws.grad = None
                fused_linear_sva(hs, ws, ht, wt, k, chunk_size=chunk).sum().backward()

            def unfused():
                hs.grad = ws.grad = None
                sva_loss_reference(hs @ ws.t(), (ht @ wt.t()), k).sum().backward()

            flops = 2 * n * vocab * hidden  # the teacher logits matmul dominates
            bench.run("reference: matmul + eager loss", {**case, "H": hidden}, unfused, flops=3 * flops)
            bench.run("ours: fused_linear_sva", {**case, "H": hidden}, fused, flops=flops)
            del hs, ws, ht, wt
    bench.report(csv_path=args.csv)


if __name__ == "__main__":
    main()
