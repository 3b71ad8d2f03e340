"""Precompute a teacher's top-k (ids + logits) over rollouts, for OPD without a co-located teacher.

    python tools/precompute_teacher_topk.py --config examples/configs/opd_tiny_cpu.yaml \\
        --teacher ckpt/teacher_search --domains search --output out/topk_search
    torchrun --nproc-per-node 8 tools/precompute_teacher_topk.py \\
        --config examples/configs/opd_35b_a3b.yaml \\
        --teacher ckpt/teacher_search --domains search --output out/topk_search \\
        parallel.tensor_parallel=2 parallel.expert_parallel=4

The training config gives the model (preset, overrides, backend, bf16), the parallel layout the
teacher runs under, the rollout datasets (data.prefixes, data.max_seq_len) and opd.topk /
opd.real_vocab_size / opd.chunk_size; trailing KEY=VALUE arguments override it as in training.
Every document of data.prefixes whose domain is in --domains is scored at its loss positions.
Then train with ``opd.teacher_topk={search: out/topk_search}`` instead of ``opd.teachers``.
Store format and checks: ``megatron_a1/training/teacher_topk.py``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--config", required=True, help="training config YAML (the OPD run's)")
    ap.add_argument("--teacher", required=True,
                    help="teacher checkpoint dir (iter_* or one with `latest`)")
    ap.add_argument("--domains", required=True, help="comma-separated domains this teacher serves")
    ap.add_argument("--output", required=True, help="store directory to write")
    ap.add_argument("--topk", type=int, help="k to store (default: opd.topk; may exceed it)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_intermixed_args(argv)

    from megatron_a1.configs import ConfigError, load_config
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.teacher_topk import precompute

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        manifest = precompute(cfg, args.teacher, args.domains.split(","), args.output,
                              topk=args.topk, overwrite=args.overwrite,
                              progress=not args.no_progress)
    except (ConfigError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest:
        rows = sum(s["rows"] for s in manifest["shards"])
        docs = sum(d["served_documents"] for d in manifest["datasets"])
        print(f"wrote {args.output}: top-{manifest['k']} of {docs} documents, {rows:,} positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
