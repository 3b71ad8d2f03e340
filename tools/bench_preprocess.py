"""Preprocessing throughput (tokens/s): ours vs the Megatron-LM ``tools/preprocess_data.py``
approach, same rendered text, same tokenizer, same worker count.

    python tools/bench_preprocess.py                 # full corpus, 1 and 2 workers
    python tools/bench_preprocess.py --smoke         # tiny corpus: proves the script runs
    python tools/bench_preprocess.py --csv bench.csv

* ``ours``: ``megatron_a1.data.preprocess`` on trajectory JSONL — decode, validate, render the
  Qwen3.5 template natively, tokenise, derive loss masks, write tokens + masks + metadata.
* ``megatron-lm``: the baseline users know — a ``multiprocessing.Pool`` whose workers
  ``json.loads`` each line of a ``{"text": ...}`` JSONL and tokenise the text, results written with
  ``IndexedDatasetBuilder``. Its input is the *same conversations already rendered* to the
  template's text by us, so the baseline does strictly less work (no rendering, no masks).

Both count tokens written per second of wall time, including pool start-up and tokenizer loading
(as a user running either tool would see). The corpus is the bundled ``examples/data`` sample and
test fixtures, repeated with varied ids until it reaches ``--records`` records.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

from megatron_a1.benchmarking import Bench
from megatron_a1.data.preprocess import PreprocessConfig, preprocess
from megatron_a1.data.records import parse_line
from megatron_a1.data.render import document_plan, render_messages
from megatron_a1.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "examples", "data", "*.jsonl"),
           os.path.join(ROOT, "tests", "fixtures", "trajectories", "[!b]*.jsonl")]


def build_corpus(directory: str, records: int) -> tuple[str, str]:
    """Write ``records`` trajectories and the same conversations rendered to text."""
    base = []
    for pattern in SOURCES:
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                base += [line for line in f if line.strip()]
    traj_path = os.path.join(directory, "traj.jsonl")
    text_path = os.path.join(directory, "text.jsonl")
    with open(traj_path, "w") as ft, open(text_path, "w") as fx:
        for i in range(records):
            rec = json.loads(base[i % len(base)])
            rec["id"] = f"{rec.get('id')}-{i}"
            line = json.dumps(rec, ensure_ascii=False)
            ft.write(line + "\n")
            traj = parse_line(line)
            for _, end, _ in document_plan(traj.messages, "split"):
                text = render_messages(traj.messages[:end], traj.tools).text
                fx.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return traj_path, text_path


# ---------------------------------------------------------------- the Megatron-LM approach
class _Encoder:
    """Per-worker tokenizer, as Megatron-LM's ``Encoder.initializer`` sets one up."""

    tokenizer = None

    @classmethod
    def initializer(cls, spec: str) -> None:
        cls.tokenizer = load_tokenizer(spec)

    @classmethod
    def encode(cls, line: str):
        text = json.loads(line)["text"]
        ids = cls.tokenizer.encode(text)
        return ids, len(line)


def megatron_lm_preprocess(text_path: str, prefix: str, tokenizer: str, workers: int) -> int:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    vocab = load_tokenizer(tokenizer).vocab_size
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
    tokens = 0
    with mp.get_context("spawn").Pool(workers, _Encoder.initializer, (tokenizer,)) as pool, \
            open(text_path) as fin:
        for ids, _ in pool.imap(_Encoder.encode, fin, 32):
            builder.add_document(np.asarray(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--records", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts (default: 1 2; --smoke: 1)")
    p.add_argument("--tokenizer", default="qwen")
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    records = a.records or (60 if a.smoke else 20000)
    workers = a.workers or ([1] if a.smoke else [1, 2])
    bench = Bench("preprocess", smoke=a.smoke, warmup=0, iters=1)
    with tempfile.TemporaryDirectory() as tmp:
        traj, text = build_corpus(tmp, records)
        tokens = {}
        for w in workers:
            case = {"records": records, "workers": w}

            def ours(w=w):
                cfg = PreprocessConfig(inputs=[traj], tokenizer=a.tokenizer, workers=w,
                                       output_prefix=os.path.join(tmp, f"ours{w}"),
                                       progress=False)
                tokens["ours"] = preprocess(cfg)["tokens_written"]

            def baseline(w=w):
                tokens["megatron-lm"] = megatron_lm_preprocess(
                    text, os.path.join(tmp, f"mlm{w}"), a.tokenizer, w)

            for impl, fn in (("megatron-lm", baseline), ("ours", ours)):
                row = bench.run(impl, case, fn)
                if row.ms is not None:
                    row.metrics["tokens"] = tokens[impl]
                    row.metrics["ktok/s"] = tokens[impl] / (row.ms / 1e3) / 1e3
        bench.report(csv_path=a.csv)
    if tokens.get("ours") != tokens.get("megatron-lm"):
        print(f"token counts differ: {tokens}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"(total {time.time() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
