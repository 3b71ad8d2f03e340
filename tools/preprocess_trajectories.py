"""Preprocess agent trajectories (JSONL) into tokenised, loss-masked Megatron indexed datasets.

    python tools/preprocess_trajectories.py --input 'data/*.jsonl.gz' --tokenizer qwen \\
        --output-prefix out/sft --workers 8 --max-seq-len 131072 --policy split

Writes OUT.bin/.idx (tokens), OUT.loss_mask.bin/.idx, OUT.meta.jsonl, OUT.dataset.json
(tokenizer and vocabulary size) and OUT.report.json (every input line accounted for), and prints
a one-line summary on stderr. Exit status 0 on success; 1 when the run fails (unreadable or
truncated input, --strict at the first bad record, no documents without --allow-empty, too many
rejects under --max-reject-fraction, a worker or tokenizer failure): the error is printed in one
line, the report is written when input was read, and nothing at OUT opens as a dataset.
"""
from __future__ import annotations

import argparse
import signal
import sys

from megatron_a1.data.preprocess import PreprocessConfig, PreprocessError, preprocess, summary_line
from megatron_a1.data.tokenizer import QWEN35_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSONL or JSONL.gz files or glob patterns (quoted), read in order; "
                        "required")
    p.add_argument("--tokenizer", default="qwen",
                   help=f"one of the names {', '.join(QWEN35_NAMES)} (the offline Qwen3.5 "
                        "vocabulary), a .tiktoken vocabulary file (Qwen3.5 special tokens), a "
                        "tokenizer.json or a model directory holding one, or a SentencePiece "
                        ".model (default: %(default)s)")
    p.add_argument("--output-prefix", required=True, metavar="OUT",
                   help="where the dataset files go (OUT.bin, OUT.idx, ...); required")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that decode, render and tokenise; 1 does it in the main "
                        "process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per worker, each on its own chunk: tiktoken releases the GIL "
                        "while encoding, so tokenisation can overlap parsing and rendering; "
                        "that pays only with spare cores (with every core busy a second "
                        "thread measured slower) (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="documents longer than N tokens are handled per --overlong "
                        "(default: no limit)")
    p.add_argument("--overlong", choices=["reject", "truncate"], default="reject",
                   help="an over-long document is dropped (reject) or cut to its first N "
                        "tokens (truncate); either way it is listed in the report "
                        "(default: %(default)s)")
    p.add_argument("--policy", choices=["split", "whole"], default="split",
                   help="multi-query conversations: one document per real user query, trained "
                        "on that query's answers (split), or one document training every "
                        "assistant turn (whole) (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="fail at the first rejected record, including a line that is not UTF-8 "
                        "(default: off: reject it, report it, continue)")
    p.add_argument("--allow-empty", action="store_true",
                   help="succeed, writing only the report, when no document results "
                        "(default: off: that is an error naming the inputs)")
    p.add_argument("--max-reject-fraction", type=float, default=None, metavar="F",
                   help="fail (report still written) when more than this fraction of the "
                        "records is rejected (default: no limit)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (default: a bar is shown)")
    return p


def parse_args(argv=None) -> PreprocessConfig:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        return PreprocessConfig(inputs=a.input, tokenizer=a.tokenizer,
                                output_prefix=a.output_prefix, workers=a.workers,
                                threads=a.threads,
                                max_seq_len=a.max_seq_len, overlong=a.overlong,
                                policy=a.policy, strict=a.strict, allow_empty=a.allow_empty,
                                max_reject_fraction=a.max_reject_fraction,
                                progress=not a.no_progress)
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the partial files are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = preprocess(cfg)
    except PreprocessError as exc:
        if exc.report is not None:
            print(summary_line(exc.report), file=sys.stderr)
        print(f"preprocess: error: {exc}", file=sys.stderr)
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
