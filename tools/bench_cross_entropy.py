"""Benchmark the SFT loss head: output layer + cross-entropy, forward + backward, same inputs.

Rows per case:
  ours                 a1_kernels.cross_entropy.fused_linear_cross_entropy (Triton kernels on a GPU
                       or under TRITON_INTERPRET=1; on CPU also its chunked PyTorch path)
  Liger-style chunked  PyTorch chunk loop that computes both gradients during the forward
                       (written here as the baseline; scalar loss only)
  megatron-core        ColumnParallelLinear + tensor_parallel.vocab_parallel_cross_entropy on full
                       [N, V] logits (what SFT ran before the fused loss)

    python tools/bench_cross_entropy.py                 # GPU: N ∈ {4K, 16K, 64K}, bf16, H = 2048,
                                                        #   V = 124,160 (the TP=2 shard)
    python tools/bench_cross_entropy.py --smoke         # CPU-sized shapes (proves the script runs)
    python tools/bench_cross_entropy.py --csv bench.csv # also append rows with device/versions/date

TFLOP/s counts the three useful matmuls (logits, ∂hidden, ∂weight: 6·N·V·H) for every row, so
ours (which recomputes the logits in backward) is charged for its fourth. Peak memory is above
the inputs (CUDA allocator on a GPU, tensor storages on CPU).
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels, interpreted

from a1_kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402
from megatron_a1.benchmarking import Bench  # noqa: E402


class LigerStyleChunkedCE(torch.autograd.Function):
    """Sum of token cross-entropies; gradients formed chunk by chunk in the forward pass (so the
    backward only scales them by the scalar upstream gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i:i + chunk], labels[i:i + chunk]
            z = (h @ weight.t()).float()
            keep = (y != -100).float()
            lse = torch.logsumexp(z, dim=1)
            safe = y.clamp(min=0)
            total += ((lse - z.gather(1, safe[:, None])[:, 0]) * keep).sum()
            dz = torch.softmax(z, dim=1)
            dz[torch.arange(len(y), device=y.device), safe] -= 1.0
            dz = (dz * keep[:, None]).to(hidden.dtype)
            grad_h[i:i + chunk] = dz @ weight
            grad_w += (dz.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def megatron_head(hidden_size: int, vocab: int, dtype):
    """megatron-core's SFT head on one rank: (hidden, weight, labels) → per-token loss [N]."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    from megatron_a1.runtime import ParallelConfig, initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(ParallelConfig())
    tp = parallel_state.get_tensor_model_parallel_group()
    layer = ColumnParallelLinear(hidden_size, vocab, config=ModelParallelConfig(params_dtype=dtype),
                                 init_method=lambda x: x, bias=False,
                                 skip_weight_param_allocation=True, tp_group=tp)

    def head(hidden, weight, labels):
        logits, _ = layer(hidden[:, None, :], weight=weight)
        return vocab_parallel_cross_entropy(logits, labels.clamp(min=0)[:, None], tp_group=tp)[:, 0]

    return head


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--csv", default=None, help="append the rows here")
    ap.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default 4096; "
                    "smoke 128)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        ns, vocab, hidden_size, dtype, chunk = [256, 1024], 2048, 64, torch.float32, 128
    else:
        ns, vocab, hidden_size, dtype = [4096, 16384, 65536], 124_160, 2048, torch.bfloat16
        chunk = 4096
    chunk = args.chunk or chunk
    where = ("Triton" if dev == "cuda" else "Triton interpreter"
             if os.environ.get("TRITON_INTERPRET") == "1" else "chunked PyTorch")
    bench = Bench("cross_entropy", smoke=args.smoke)
    mega = megatron_head(hidden_size, vocab, dtype)
    for n in ns:
        case = {"N": n, "V": vocab, "H": hidden_size, "chunk": chunk,
                "dtype": str(dtype).replace("torch.", "")}
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(n, hidden_size, device=dev, generator=g).to(dtype).requires_grad_(True)
        w = (torch.randn(vocab, hidden_size, device=dev, generator=g) * 0.02).to(dtype)
        w.requires_grad_(True)
        labels = torch.randint(0, vocab, (n,), device=dev, generator=g)
        labels[torch.rand(n, device=dev, generator=g) < 0.3] = -100  # prompt / tool tokens
        mask = (labels != -100).float()

        def step(loss_fn):
            def run():
                h.grad = w.grad = None
                loss_fn().backward()
            return run

        flops = 6 * n * vocab * hidden_size
        ours = step(lambda: fused_linear_cross_entropy(h, w, labels, chunk_size=chunk).sum())
        bench.run(f"ours ({where})", case, ours, flops=flops)
        if dev == "cpu" and where == "Triton interpreter":  # also the path CPU training takes
            os.environ["TRITON_INTERPRET"] = "0"  # read by the launcher at each call
            bench.run("ours (chunked PyTorch)", case, ours, flops=flops)
            os.environ["TRITON_INTERPRET"] = "1"
        bench.run("Liger-style chunked PyTorch", case,
                  step(lambda: LigerStyleChunkedCE.apply(h, w, labels, chunk)), flops=flops)
        bench.run("megatron-core output layer + vocab_parallel_cross_entropy", case,
                  step(lambda: (mega(h, w, labels) * mask).sum()), flops=flops)
        del h, w, labels, mask
        if dev == "cuda":
            torch.cuda.empty_cache()
    bench.report(csv_path=args.csv)


if __name__ == "__main__":
    main()
