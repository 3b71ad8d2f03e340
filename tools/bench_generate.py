"""Benchmark rollout generation: EmbeddedEngine's incremental decoding vs full re-forwards.

EmbeddedEngine keeps a KV cache and the Gated DeltaNet states and feeds one token per step; the
naive loop re-runs the full forward of every prefix for each new token.

    python tools/bench_generate.py --smoke                  # CPU: tiny_test model, short prompts
    python tools/bench_generate.py                          # the `tiny` preset, longer rollouts
    python tools/bench_generate.py --prompts 16 --new-tokens 256 --csv bench.csv

Both decode greedily the same random prompts with the same random model (a batch of prompts per
step: the engine advances every row by one token, the naive loop re-forwards the packed
prefixes), so their tokens must agree (the ``agree`` column). tokens/s counts generated tokens
(the prefill included in the engine's time). On a shared CPU, ``OMP_NUM_THREADS=1`` steadies
the figures: the tiny models' ops are too small for intra-op threads.
"""
from __future__ import annotations

import argparse

import torch

from megatron_a1.benchmarking import Bench
from megatron_a1.model.build import build_model
from megatron_a1.model.config import preset
from megatron_a1.model.parity import megatron_logits
from megatron_a1.rollout.embedded import EmbeddedEngine
from megatron_a1.rollout.engine import SamplingParams
from megatron_a1.runtime import destroy, initialize


def naive_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding by a full packed forward of all prefixes per generated token."""
    seqs = [list(p) for p in prompts]
    device = model.output_layer.weight.device
    for _ in range(new_tokens):
        lens = torch.tensor([len(s) for s in seqs])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(device)
        ids = torch.tensor([t for s in seqs for t in s], device=device)
        last = megatron_logits(model, ids, cu)[cu[1:] - 1]
        for s, t in zip(seqs, last.argmax(-1).tolist()):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU-sized: tiny_test, 2 prompts of 96 tokens, 16 new tokens each")
    ap.add_argument("--preset", default=None, help="model preset (default: tiny; smoke: tiny_test)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts decoded together")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt")
    ap.add_argument("--backend", default="local", choices=["local", "auto", "te"])
    ap.add_argument("--csv", default=None, help="append the rows to this CSV")
    args = ap.parse_args()
    defaults = (("tiny_test", 2, 96, 16) if args.smoke else ("tiny", 8, 256, 128))
    name, n_prompts, prompt_len, new_tokens = (
        given if given is not None else default
        for given, default in zip((args.preset, args.prompts, args.prompt_len, args.new_tokens),
                                  defaults))

    cfg = preset(name)
    rt = initialize(seed=0)
    try:
        model = build_model(cfg, cfg.to_transformer_config(None), pg_collection=rt.pg_collection,
                            backend=args.backend,
                            max_seq_len=min(cfg.max_position_embeddings,
                                            prompt_len + new_tokens)).eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist()
                   for _ in range(n_prompts)]
        engine = EmbeddedEngine(model)
        sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens)
        reference = naive_greedy(model, prompts, new_tokens)
        agree = [g.token_ids for g in engine.generate(prompts, sampling)] == reference

        bench = Bench("generate", smoke=args.smoke, warmup=1, iters=3)
        case = {"model": name, "prompts": n_prompts, "prompt_len": prompt_len,
                "new_tokens": new_tokens}
        generated = n_prompts * new_tokens
        for impl, fn in (
            ("EmbeddedEngine (incremental)", lambda: engine.generate(prompts, sampling)),
            ("naive full re-forward", lambda: naive_greedy(model, prompts, new_tokens)),
        ):
            row = bench.run(impl, case, fn)
            if row.ms is not None:
                row.metrics["tokens/s"] = generated / (row.ms * 1e-3)
            row.metrics["agree"] = agree
        bench.report(csv_path=args.csv)
    finally:
        destroy()


if __name__ == "__main__":
    main()
