"""Preprocessing end to end: Megatron's own ``IndexedDataset`` reads back exactly the rendered
documents (tokens and masks, already proven against the template in test_data_render.py), bad
input is reported line by line with nothing else lost, and the output does not depend on the
worker count. Also the HF ``tokenizer.json`` and SentencePiece backends against their own
whole-string encoders."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_a1.data.preprocess import PreprocessConfig, StrictModeError, preprocess
from megatron_a1.data.render import render
from megatron_a1.data.tokenizer import load_tokenizer
from test_data_render import FIXTURES, TemplateOracle, fixture_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["search", "coding", "science", "instruction", "tool_use"]


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


@pytest.fixture(scope="module")
def run(tmp_path_factory, qwen):
    """All fixture files (bad.jsonl first by glob order), one worker."""
    prefix = str(tmp_path_factory.mktemp("pre") / "fx")
    report = preprocess(PreprocessConfig(inputs=[os.path.join(FIXTURES, "*.jsonl")],
                                         tokenizer="qwen", output_prefix=prefix, progress=False),
                        tokenizer=qwen)
    return prefix, report


def _expected_documents(qwen, policy="split"):
    """(domain, id, tokens, mask) of every good record, in input order, via render()."""
    out = []
    for name in ["bad"] + sorted(GOOD):
        with open(os.path.join(FIXTURES, name + ".jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    docs = render(rec["messages"], rec.get("tools"), tokenizer=qwen, policy=policy)
                except Exception:  # noqa: BLE001 - bad lines are checked separately
                    continue
                out += [(rec.get("domain"), rec.get("id"), d.tokens, d.loss_mask) for d in docs]
    return out


def test_indexed_dataset_reads_back_what_was_written(run, qwen):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, report = run
    tokens = IndexedDataset(prefix)
    masks = IndexedDataset(prefix + ".loss_mask")
    with open(prefix + ".meta.jsonl") as f:
        meta = [json.loads(line) for line in f]
    expected = _expected_documents(qwen)
    assert len(tokens) == len(masks) == len(meta) == len(expected) == report["documents_written"]
    assert tokens[0].dtype == np.int32 and masks[0].dtype == np.uint8
    for i, (domain, rid, toks, mask) in enumerate(expected):
        assert tokens[i].tolist() == toks
        assert masks[i].tolist() == mask
        assert (meta[i]["domain"], meta[i]["id"]) == (domain, rid)
    assert report["tokens_written"] == sum(len(e[2]) for e in expected)
    assert report["masked_tokens"] == sum(sum(e[3]) for e in expected)
    # Every domain of the issue is present.
    assert {"search", "coding", "engineering", "science", "instruction", "tool"} <= set(
        report["per_domain"])


def test_bad_input_reported_line_by_line(run):
    prefix, report = run
    bad = os.path.join(FIXTURES, "bad.jsonl")
    rejected = {(r["file"], r["line"]): r["reason"] for r in report["rejected"]}
    want = {2: "invalid JSON", 3: "not a JSON object", 4: "unknown role", 5: "no user query",
            6: "not valid JSON", 7: "without a function name", 8: "without a preceding tool call",
            9: "messages missing, empty"}
    assert set(rejected) == {(bad, n) for n in want}
    for n, reason in want.items():
        assert reason in rejected[(bad, n)]
    n_lines = sum(1 for p in os.listdir(FIXTURES) for _ in open(os.path.join(FIXTURES, p)))
    assert report["lines_read"] == n_lines
    assert report["lines_read"] == report["blank_lines"] + report["records_ok"] + report[
        "records_rejected"]
    # The good records around the bad ones in bad.jsonl are written.
    with open(prefix + ".meta.jsonl") as f:
        ids = [json.loads(line)["id"] for line in f]
    assert "ok-before" in ids and "ok-after" in ids
    assert report["records_ok"] == len(fixture_records()) + 2
    with open(prefix + ".report.json") as f:
        assert json.load(f)["rejected"] == report["rejected"]


def test_strict_fails_at_first_bad_record(tmp_path, qwen):
    prefix = str(tmp_path / "strict")
    cfg = PreprocessConfig(inputs=[os.path.join(FIXTURES, "bad.jsonl")], tokenizer="qwen",
                           output_prefix=prefix, strict=True, progress=False)
    with pytest.raises(StrictModeError, match="bad.jsonl:2"):
        preprocess(cfg, tokenizer=qwen)
    assert not os.path.exists(prefix + ".bin")


def test_overlong_reject_and_truncate(tmp_path, qwen):
    src = os.path.join(FIXTURES, "coding.jsonl")
    limit = 700
    docs = [d for r in fixture_records() if r["id"] in ("code-001", "code-002")
            for d in render(r["messages"], r["tools"], tokenizer=qwen)]
    long_docs = [d for d in docs if len(d.tokens) > limit]
    assert 0 < len(long_docs) < len(docs)
    for policy in ("reject", "truncate"):
        prefix = str(tmp_path / policy)
        rep = preprocess(PreprocessConfig(inputs=[src], tokenizer="qwen", output_prefix=prefix,
                                          max_seq_len=limit, overlong=policy, progress=False),
                         tokenizer=qwen)
        assert len(rep["overlong_documents"]) == len(long_docs)
        assert all(o["action"] == policy for o in rep["overlong_documents"])
        kept = len(docs) - len(long_docs) if policy == "reject" else len(docs)
        assert rep["documents_written"] == kept
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        written = IndexedDataset(prefix)  # keep it alive: sequence_lengths views its mmap
        lengths = written.sequence_lengths.copy()
        assert max(lengths) <= limit
        if policy == "truncate":
            assert sorted(lengths.tolist()) == sorted(min(len(d.tokens), limit) for d in docs)


def test_cli_gzip_glob_and_workers_give_identical_output(tmp_path, run):
    """The CLI with 2 worker processes over gzipped copies = the in-process run, byte for byte."""
    prefix1, _ = run
    data = tmp_path / "in"
    data.mkdir()
    for p in sorted(os.listdir(FIXTURES)):
        with open(os.path.join(FIXTURES, p), "rb") as f, gzip.open(data / (p + ".gz"), "wb") as g:
            shutil.copyfileobj(f, g)
    prefix2 = str(tmp_path / "cli")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_trajectories.py"), "--input",
         str(data / "*.jsonl.gz"), "--tokenizer", "qwen", "--output-prefix", prefix2,
         "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "8 rejected" in proc.stderr and "bad.jsonl.gz:4" in proc.stderr
    for suffix in (".bin", ".idx", ".loss_mask.bin", ".loss_mask.idx"):
        with open(prefix1 + suffix, "rb") as a, open(prefix2 + suffix, "rb") as b:
            assert a.read() == b.read(), suffix
    strict = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_trajectories.py"), "--input",
         str(data / "bad.jsonl.gz"), "--output-prefix", str(tmp_path / "s"), "--strict",
         "--no-progress"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "bad.jsonl.gz:2" in strict.stderr


def test_inspect_dataset_shows_masked_spans(run):
    prefix, _ = run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_dataset.py"),
                           prefix, "--index", "0", "--plain"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[[" in proc.stdout and "]]" in proc.stdout and "<|im_end|>]]" in proc.stdout


# ---------------------------------------------------------------- other tokenizer backends
def _chat_corpus(oracle: TemplateOracle) -> list[str]:
    return [oracle.text(r["messages"], r.get("tools")) for r in fixture_records()]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
            "<tool_response>", "</tool_response>", "<think>", "</think>"]


def test_hf_tokenizer_json_backend(tmp_path, chat_template_path):
    """A byte-level BPE tokenizer.json trained here: render() == tokenizers' own whole-string
    encode of the template output, and masks equal the prefix oracle's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    oracle = TemplateOracle(chat_template_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_chat_corpus(oracle), trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ours = load_tokenizer(str(path))
    assert ours.im_end == tok.token_to_id("<|im_end|>") and ours.pad == tok.token_to_id(
        "<|endoftext|>")
    _check_backend(ours, lambda text: tok.encode(text, add_special_tokens=False).ids, oracle)


def test_sentencepiece_backend(tmp_path, chat_template_path):
    import sentencepiece as spm

    oracle = TemplateOracle(chat_template_path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for t in _chat_corpus(oracle) for line in t.split("\n")
                               if line.strip()),
        model_writer=model, vocab_size=400, user_defined_symbols=SPECIALS, minloglevel=3,
        hard_vocab_limit=False)
    path = tmp_path / "spm.model"
    path.write_bytes(model.getvalue())
    ours = load_tokenizer(str(path))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert ours.im_start == sp.piece_to_id("<|im_start|>")
    # SentencePiece drops newlines/extra spaces when normalising, so only tokens are compared
    # with its own encode; masks are checked to cover exactly the assistant's pieces.
    for rec in fixture_records()[:6]:
        for doc in render(rec["messages"], rec.get("tools"), tokenizer=ours, keep_text=True):
            assert doc.tokens == sp.encode(doc.text)
            masked = [t for t, m in zip(doc.tokens, doc.loss_mask) if m]
            assert masked and masked[-1] == ours.im_end
            assert ours.im_start not in masked


def _check_backend(ours, whole_encode, oracle: TemplateOracle):
    n = 0
    for rec in fixture_records():
        msgs, tools = rec["messages"], rec.get("tools")
        for doc in render(msgs, tools, tokenizer=ours, keep_text=True):
            assert doc.tokens == whole_encode(doc.text)
            end = len(msgs) if doc.query_index < 0 else next(
                (j for j in range(doc.query_index + 1, len(msgs))
                 if msgs[j]["role"] == "user" and oracle.last_query(msgs[: j + 1]) == j),
                len(msgs))
            text = oracle.text(msgs[:end], tools)
            assert doc.text == text
            trained = [i for i in range(doc.query_index + 1, end) if msgs[i]["role"] == "assistant"]
            oracle_tokens = oracle.tokens
            oracle.tokens = whole_encode  # the prefix oracle, with this backend's tokenizer
            try:
                assert doc.loss_mask == oracle.expected_mask(msgs[:end], tools, trained,
                                                             doc.tokens)
            finally:
                oracle.tokens = oracle_tokens
            n += 1
    assert n >= 20


def test_bundled_examples_are_clean(tmp_path, qwen):
    """The CPU demo's sample: every record valid, all five domains, rollouts carry a domain."""
    examples = os.path.join(ROOT, "examples", "data")
    rep = preprocess(PreprocessConfig(inputs=[os.path.join(examples, "trajectories.jsonl")],
                                      tokenizer="qwen", output_prefix=str(tmp_path / "ex"),
                                      progress=False), tokenizer=qwen)
    assert rep["records_rejected"] == 0 and rep["records_ok"] >= 40
    assert set(rep["per_domain"]) == {"search", "coding", "science", "instruction", "tool"}
    assert all(d["masked_tokens"] > 0 for d in rep["per_domain"].values())
    with open(os.path.join(examples, "rollouts.jsonl")) as f:
        rollouts = [json.loads(line) for line in f]
    assert len(rollouts) >= 5 and all(r["domain"] in rep["per_domain"] for r in rollouts)
    for r in rollouts:
        assert render(r["messages"], r.get("tools"), tokenizer=qwen)
