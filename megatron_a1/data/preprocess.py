"""Trajectory JSONL -> tokenised, loss-masked Megatron indexed datasets (the library side of
``tools/preprocess_trajectories.py``).

Lines are read in the main process (plain or ``.gz`` files, globs expanded in sorted order) and
sent in chunks to a pool of workers that decode, validate, render and tokenise them; results come
back in input order, so the output is byte-identical for any ``--workers``. The main process
writes the documents and accounts for every input line in ``PREFIX.report.json``:

``lines_read = blank_lines + records_ok + records_rejected``; each rejected record is listed with
its file, line, id and reason; over-long documents (more tokens than ``max_seq_len``) are
rejected or truncated per ``overlong`` and always listed.
"""
from __future__ import annotations

import glob
import gzip
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .indexed import REPORT_SUFFIX, DocumentWriter, output_paths
from .records import RecordError, parse_line
from .render import POLICIES, render_trajectory, spells_special_token
from .tokenizer import Tokenizer, load_tokenizer

OVERLONG = ("reject", "truncate")


@dataclass
class PreprocessConfig:
    inputs: list[str]
    """Input files or glob patterns (``.jsonl`` or ``.jsonl.gz``)."""
    tokenizer: str
    """Tokenizer spec for :func:`~megatron_a1.data.tokenizer.load_tokenizer` (e.g. ``qwen``)."""
    output_prefix: str
    """Writes ``PREFIX.bin/.idx``, ``PREFIX.loss_mask.bin/.idx``, ``.meta.jsonl``, ``.report.json``."""
    workers: int = 1
    """Worker processes for decode+render+tokenise (1: in the main process)."""
    max_seq_len: int | None = None
    """Documents longer than this are handled per ``overlong`` (None: no limit)."""
    overlong: str = "reject"
    """``reject`` (drop the document, report it) or ``truncate`` (keep the first max_seq_len)."""
    policy: str = "split"
    """Multi-query policy: ``split`` (one document per real query) or ``whole``."""
    strict: bool = False
    """Stop with an error at the first rejected record."""
    chunk_size: int = 32
    """Records per task sent to a worker."""
    progress: bool = True
    """Show a tqdm progress bar (records/s, tokens/s) on stderr."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError("max_seq_len must be positive")


class StrictModeError(RuntimeError):
    """Raised under ``strict`` at the first rejected record."""


@dataclass
class RecordResult:
    """What a worker made of one input line."""

    source: str
    line: int
    id: str | None = None
    domain: str | None = None
    blank: bool = False
    error: str | None = None
    special_text: bool = False
    documents: list = field(default_factory=list)  # (tokens int32, mask uint8, query_index, truncated)
    overlong: list = field(default_factory=list)  # dicts for the report


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (globs sorted, duplicates removed, order kept)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        files += [m for m in matches if m not in files]
    return files


def iter_lines(files: list[str]) -> Iterator[tuple[str, int, str]]:
    """``(file, 1-based line number, line)`` for every line of every file."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                yield path, n, line


def _chunks(lines, size: int):
    chunk = []
    for item in lines:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class RecordProcessor:
    """Decode, validate, render and tokenise lines (one per worker process)."""

    def __init__(self, cfg: PreprocessConfig, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
        self.specials = list(self.tokenizer.special_tokens())

    def __call__(self, source: str, line_no: int, line: str) -> RecordResult:
        res = RecordResult(source, line_no)
        if not line.strip():
            res.blank = True
            return res
        try:
            traj = parse_line(line)
            res.id, res.domain = traj.id, traj.domain
            docs = render_trajectory(traj, self.tokenizer, self.cfg.policy)
        except RecordError as exc:
            res.error = str(exc)
            try:  # best effort: name the record in the report
                obj = json.loads(line)
                res.id = str(obj["id"]) if isinstance(obj, dict) and "id" in obj else None
            except (json.JSONDecodeError, TypeError):
                pass
            return res
        res.special_text = spells_special_token(traj.messages, self.specials)
        limit = self.cfg.max_seq_len
        for doc in docs:
            tokens = np.asarray(doc.tokens, dtype=np.int32)
            mask = np.asarray(doc.loss_mask, dtype=np.uint8)
            truncated = None
            if limit is not None and tokens.size > limit:
                res.overlong.append({"file": source, "line": line_no, "id": traj.id,
                                     "query_index": doc.query_index, "length": int(tokens.size),
                                     "action": self.cfg.overlong})
                if self.cfg.overlong == "reject":
                    continue
                truncated = int(tokens.size)
                tokens, mask = tokens[:limit], mask[:limit]
            res.documents.append((tokens, mask, doc.query_index, truncated))
        return res


# Worker-process state: multiprocessing initialisers can only hand state to later tasks through
# a module attribute, so the per-process RecordProcessor lives here (never used in the parent).
_WORKER: RecordProcessor | None = None


def _init_worker(cfg: PreprocessConfig) -> None:
    global _WORKER
    _WORKER = RecordProcessor(cfg)


def _tokenizer_info() -> tuple[str, int]:
    return _WORKER.tokenizer.name, _WORKER.tokenizer.vocab_size


def _work(chunk):
    return [_WORKER(*item) for item in chunk]


def preprocess(cfg: PreprocessConfig, tokenizer: Tokenizer | None = None) -> dict:
    """Run the pipeline; returns the report (also written to ``PREFIX.report.json``).

    Raises :class:`StrictModeError` under ``cfg.strict`` at the first bad record (partial
    outputs are removed).
    """
    from tqdm import tqdm

    files = expand_inputs(cfg.inputs)
    pool = processor = None
    if cfg.workers > 1:
        # The parent only writes: it asks a worker about the tokenizer instead of loading it.
        pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (cfg,))
        tok_name, vocab_size = pool.apply(_tokenizer_info)
    else:
        processor = RecordProcessor(cfg, tokenizer)
        tok_name, vocab_size = processor.tokenizer.name, processor.tokenizer.vocab_size
    writer = DocumentWriter(cfg.output_prefix, vocab_size)
    report = {
        "inputs": files, "tokenizer": tok_name, "policy": cfg.policy,
        "max_seq_len": cfg.max_seq_len, "overlong_policy": cfg.overlong,
        "lines_read": 0, "blank_lines": 0, "records_ok": 0, "records_rejected": 0,
        "documents_written": 0, "tokens_written": 0, "masked_tokens": 0,
        "special_token_text_records": 0, "per_domain": {}, "rejected": [],
        "overlong_documents": [],
    }
    chunks = _chunks(iter_lines(files), cfg.chunk_size)
    if pool is not None:
        results = pool.imap(_work, chunks)
    else:
        results = ([processor(*item) for item in chunk] for chunk in chunks)
    bar = tqdm(unit="rec", disable=not cfg.progress, file=sys.stderr, smoothing=0.1)
    start = time.perf_counter()
    try:
        for batch in results:
            for res in batch:
                _account(res, report, writer, cfg)
            bar.update(len(batch))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_s=f"{report['tokens_written'] / elapsed:,.0f}", refresh=False)
    except StrictModeError:
        writer.finalize()
        for path in output_paths(cfg.output_prefix):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    writer.finalize()
    report["seconds"] = round(time.perf_counter() - start, 3)
    with open(cfg.output_prefix + REPORT_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    return report


def _account(res: RecordResult, report: dict, writer: DocumentWriter, cfg: PreprocessConfig):
    report["lines_read"] += 1
    if res.blank:
        report["blank_lines"] += 1
        return
    if res.error is not None:
        report["records_rejected"] += 1
        report["rejected"].append({"file": res.source, "line": res.line, "id": res.id,
                                   "reason": res.error})
        if cfg.strict:
            raise StrictModeError(f"{res.source}:{res.line}: {res.error}")
        return
    report["records_ok"] += 1
    report["special_token_text_records"] += int(res.special_text)
    report["overlong_documents"] += res.overlong
    dom = report["per_domain"].setdefault(
        res.domain, {"records": 0, "documents": 0, "tokens": 0, "masked_tokens": 0})
    dom["records"] += 1
    for tokens, mask, query_index, truncated in res.documents:
        writer.add(tokens, mask, {"domain": res.domain, "source": res.source, "line": res.line,
                                  "id": res.id, "query_index": query_index,
                                  "truncated": truncated})
        n, m = int(tokens.size), int(mask.sum())
        report["documents_written"] += 1
        report["tokens_written"] += n
        report["masked_tokens"] += m
        dom["documents"] += 1
        dom["tokens"] += n
        dom["masked_tokens"] += m


def summary_line(report: dict) -> str:
    """The one-line stderr summary of a run."""
    return (f"preprocess: {report['lines_read']} lines, {report['records_ok']} records ok, "
            f"{report['records_rejected']} rejected, {report['blank_lines']} blank; "
            f"{report['documents_written']} documents, {report['tokens_written']:,} tokens "
            f"({report['masked_tokens']:,} trained), {len(report['overlong_documents'])} "
            f"over-long ({report['overlong_policy']})")


__all__ = ["PreprocessConfig", "StrictModeError", "preprocess", "summary_line"]
