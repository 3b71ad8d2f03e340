"""Preprocess agent trajectories (JSONL) into tokenised, loss-masked Megatron indexed datasets.

    python tools/preprocess_trajectories.py --input 'data/*.jsonl.gz' --tokenizer qwen \
        --output-prefix out/sft --workers 8 --max-seq-len 131072 --policy split

Writes OUT.bin/.idx (tokens), OUT.loss_mask.bin/.idx, OUT.meta.jsonl and OUT.report.json, and
prints a one-line summary on stderr. Exit status 1 under --strict at the first bad record.
"""
from __future__ import annotations

import argparse
import sys

from megatron_a1.data.preprocess import PreprocessConfig, StrictModeError, preprocess, summary_line


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL / JSONL.gz files or globs")
    p.add_argument("--tokenizer", default="qwen",
                   help="'qwen' (offline Qwen3.5 vocabulary), a tokenizer.json or model dir, "
                        "or a SentencePiece .model")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--overlong", choices=["reject", "truncate"], default="reject")
    p.add_argument("--policy", choices=["split", "whole"], default="split")
    p.add_argument("--strict", action="store_true", help="fail at the first bad record")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return PreprocessConfig(inputs=a.input, tokenizer=a.tokenizer, output_prefix=a.output_prefix,
                            workers=a.workers, max_seq_len=a.max_seq_len, overlong=a.overlong,
                            policy=a.policy, strict=a.strict, progress=not a.no_progress)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        report = preprocess(cfg)
    except StrictModeError as exc:
        print(f"preprocess: --strict: {exc}", file=sys.stderr)
        return 1
    print(summary_line(report), file=sys.stderr)
    for bad in report["rejected"][:20]:
        print(f"  rejected {bad['file']}:{bad['line']}: {bad['reason']}", file=sys.stderr)
    if len(report["rejected"]) > 20:
        print(f"  ... {len(report['rejected']) - 20} more in {cfg.output_prefix}.report.json",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
