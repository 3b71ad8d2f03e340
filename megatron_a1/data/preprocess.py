"""Trajectory JSONL -> tokenised, loss-masked Megatron indexed datasets (the library side of
``tools/preprocess_trajectories.py``).

Pipeline. The main process reads the inputs as bytes (plain or ``.gz`` files, globs expanded in
sorted order) and cuts them into chunks of whole lines. A worker decodes, validates, renders and
tokenises a chunk into one flat token array, one flat mask array, the documents' lengths, their
metadata as JSONL text and a small account per line; the main process appends chunks to the
outputs in input order, so the output is byte-identical for any ``workers``. With ``workers=1``
the main process does the work itself; otherwise ``workers`` processes do (forked after the
tokenizer is loaded, so it is loaded once), and only those per-chunk arrays cross processes.

Accounting, in ``PREFIX.report.json``: ``lines_read = blank_lines + records_ok +
records_rejected``. A record is ok when it produced at least one document; it is rejected (and
listed with file, line, id and reason) when it is invalid, or when every one of its documents
was dropped as over-long. Over-long documents (more tokens than ``max_seq_len``) are rejected or
truncated per ``overlong`` and always listed. Lines that are not valid UTF-8 are listed in
``non_utf8`` (file, line, byte offset); they are decoded with U+FFFD replacements, or rejected
under ``strict``.

A run fails — :class:`PreprocessError`, whose message is one line, and nothing at the output
prefix that opens as a dataset — when an input cannot be read (missing, unreadable, truncated or
corrupt compression; listed in ``input_errors``), under ``strict`` at the first rejected record,
when no document was written (unless ``allow_empty``: then only the report is written), when the
rejected fraction of records exceeds ``max_reject_fraction``, or when a worker fails. The report
is written whenever the run got as far as reading input, with ``status`` saying what happened.
"""
from __future__ import annotations

import glob
import gzip
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .indexed import REPORT_SUFFIX, DocumentWriter, remove_quietly, temp_path, token_dtype
from .records import RecordError, parse_line
from .render import POLICIES, render_arrays, spells_special_token
from .tokenizer import Tokenizer, load_tokenizer

OVERLONG = ("reject", "truncate")


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]
    """Input files or glob patterns (``.jsonl`` or ``.jsonl.gz``)."""
    tokenizer: str
    """Tokenizer spec for :func:`~megatron_a1.data.tokenizer.load_tokenizer` (e.g. ``qwen``)."""
    output_prefix: str
    """Writes ``PREFIX.bin/.idx``, ``PREFIX.loss_mask.bin/.idx``, ``.meta.jsonl``,
    ``.dataset.json`` and ``.report.json``."""
    workers: int = 1
    """Processes that decode, render and tokenise (1: the main process does it)."""
    threads: int = 1
    """Threads per worker, each processing its own chunk: tiktoken releases the GIL while it
    encodes, so a second thread encodes one chunk while the first parses and renders another.
    That pays only with spare cores: with one worker per core, 2 threads measured slower."""
    max_seq_len: int | None = None
    """Documents longer than this are handled per ``overlong`` (None: no limit)."""
    overlong: str = "reject"
    """``reject`` (drop the document, report it) or ``truncate`` (keep the first max_seq_len)."""
    policy: str = "split"
    """Multi-query policy: ``split`` (one document per real query) or ``whole``."""
    strict: bool = False
    """Fail at the first rejected record (including a line that is not UTF-8)."""
    allow_empty: bool = False
    """Succeed, writing only the report, when no document results (else an error)."""
    max_reject_fraction: float | None = None
    """Fail when more than this fraction of the records is rejected (None: never)."""
    chunk_bytes: int = 1 << 20
    """Input bytes per chunk of work (whole lines; at least one line)."""
    progress: bool = True
    """Show a tqdm progress bar (records/s, tokens/s) on stderr."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError("max_seq_len must be positive")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be at least 1")
        if self.max_reject_fraction is not None and not 0 <= self.max_reject_fraction <= 1:
            raise ValueError("max_reject_fraction must be in [0, 1]")


class PreprocessError(RuntimeError):
    """A failed run; ``str(err)`` is one line, ``err.report`` the report (None when the run
    failed before reading input)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class StrictModeError(PreprocessError):
    """Raised under ``strict`` at the first rejected record."""


class WorkerError(PreprocessError):
    """A worker process failed to start or died; the message carries the worker's error."""


# ---------------------------------------------------------------- input
def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (globs sorted, duplicates removed, order kept)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PreprocessError(f"no input file matches {pattern!r}")
        for m in matches:
            if not os.path.exists(m):
                raise PreprocessError(f"input {m}: no such file")
            if not os.path.isfile(m):
                raise PreprocessError(f"input {m}: not a file")
        files += [m for m in matches if m not in files]
    return files


@dataclass
class Chunk:
    source: str
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]


class InputError(Exception):
    def __init__(self, source: str, line: int, reason: str):
        super().__init__(f"{source}:{line}: {reason}")
        self.entry = {"file": source, "line": line, "error": reason}


def _describe_read_error(path: str, exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return f"truncated compressed file ({exc})"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return f"corrupt compressed data ({exc})"
    if isinstance(exc, OSError):
        return f"cannot read ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"


def read_chunks(files: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines of every file, ``chunk_bytes`` at a time (a chunk never spans two files).

    Raises :class:`InputError` naming the file and the line where reading failed."""
    for path in files:
        try:
            f = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        except OSError as exc:
            raise InputError(path, 0, _describe_read_error(path, exc)) from None
        n = 0
        with f:
            lines, size, first = [], 0, 1
            try:
                for line in f:
                    n += 1
                    lines.append(line)
                    size += len(line)
                    if size >= chunk_bytes:
                        yield Chunk(path, first, lines)
                        lines, size, first = [], 0, n + 1
            except (EOFError, OSError, zlib.error) as exc:
                raise InputError(path, n + 1, _describe_read_error(path, exc)) from None
            if lines:
                yield Chunk(path, first, lines)


# ---------------------------------------------------------------- work
# One line's account: (line, kind, id, domain, reason, documents, tokens, masked, special text,
# byte offset of the first non-UTF-8 byte or None); kind is BLANK, OK or REJECTED.
BLANK, OK, REJECTED = 0, 1, 2


@dataclass
class ChunkResult:
    source: str
    tokens: np.ndarray  # [sum(lengths)] in the dataset's token dtype
    masks: np.ndarray  # [sum(lengths)] uint8
    lengths: np.ndarray  # [documents] int64
    meta_jsonl: str  # one JSON line per document
    records: list[tuple]
    overlong: list[dict]


class ChunkProcessor:
    """Decode, validate, render and tokenise the lines of a chunk (one per worker)."""

    def __init__(self, cfg: PreprocessConfig, tokenizer: Tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.specials = tuple(tokenizer.special_tokens())
        self.dtype = token_dtype(tokenizer.vocab_size)
        spellings = sorted((s for s in self.specials if s), key=len, reverse=True)
        self._maybe_special = re.compile(
            "|".join([re.escape(s) for s in spellings] + [r"\\u", r"\\/"]))

    def __call__(self, chunk: Chunk) -> ChunkResult:
        cfg, source = self.cfg, chunk.source
        source_json = json.dumps(source, ensure_ascii=False)
        toks, masks, lengths, metas, records, overlong = [], [], [], [], [], []
        for k, raw in enumerate(chunk.lines):
            n = chunk.first_line + k
            if not raw.strip():
                records.append((n, BLANK))
                continue
            bad_byte = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_byte = exc.start
                if cfg.strict:
                    records.append((n, REJECTED, None, None,
                                    f"not UTF-8 (byte {exc.start}: {raw[exc.start:exc.end]!r})",
                                    0, 0, 0, False, bad_byte))
                    continue
                line = raw.decode("utf-8", "replace")
            try:
                traj = parse_line(line)
                docs = render_arrays(traj.messages, traj.tools, tokenizer=self.tokenizer,
                                     policy=cfg.policy)
            except RecordError as exc:
                records.append((n, REJECTED, _best_effort_id(line), None, str(exc), 0, 0, 0,
                                False, bad_byte))
                continue
            # Message text can spell a special token only if the raw line does (JSON escapes
            # aside), so the per-message search runs only for such lines.
            special = bool(self._maybe_special.search(line)) and \
                spells_special_token(traj.messages, self.specials)
            kept = n_tok = n_mask = 0
            for query, ids, mask, _ in docs:
                truncated = None
                if cfg.max_seq_len is not None and ids.size > cfg.max_seq_len:
                    overlong.append({"file": source, "line": n, "id": traj.id,
                                     "query_index": query, "length": int(ids.size),
                                     "action": cfg.overlong})
                    if cfg.overlong == "reject":
                        continue
                    truncated = int(ids.size)
                    ids, mask = ids[:cfg.max_seq_len], mask[:cfg.max_seq_len]
                toks.append(ids)
                masks.append(mask)
                lengths.append(ids.size)
                metas.append(f'{{"domain": {dumps(traj.domain)}, "source": {source_json}, '
                             f'"line": {n}, "id": {dumps(traj.id)}, "query_index": {query}, '
                             f'"truncated": {"null" if truncated is None else truncated}}}')
                kept += 1
                n_tok += int(ids.size)
                n_mask += int(mask.sum())
            if kept:
                records.append((n, OK, traj.id, traj.domain, None, kept, n_tok, n_mask, special,
                                bad_byte))
            else:
                reason = ("no document to train on" if not docs else
                          f"every document is longer than max_seq_len={cfg.max_seq_len}")
                records.append((n, REJECTED, traj.id, traj.domain, reason, 0, 0, 0, special,
                                bad_byte))
        return ChunkResult(
            source,
            np.concatenate(toks).astype(self.dtype) if toks else np.zeros(0, self.dtype),
            np.concatenate(masks) if masks else np.zeros(0, np.uint8),
            np.asarray(lengths, dtype=np.int64),
            "".join(m + "\n" for m in metas), records, overlong)


def _best_effort_id(line: str) -> str | None:
    """The ``id`` of an invalid record, when its JSON still names one (for the report)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None
    return str(obj["id"]) if isinstance(obj, dict) and obj.get("id") is not None else None


# ---------------------------------------------------------------- worker processes
def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _worker_main(init: Callable, args: tuple, tasks, results, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        work = init(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put(("init-error", os.getpid(), _one_line(exc)))
        return
    results.put(("ready", os.getpid(), None))

    def serve():
        while True:
            item = tasks.get()
            if item is None:
                return
            i, task = item
            try:
                results.put(("ok", i, work(task)))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                results.put(("error", i, _one_line(exc)))
                return

    pool = [threading.Thread(target=serve, daemon=True) for _ in range(threads - 1)]
    for t in pool:
        t.start()
    serve()


def thread_map(fn: Callable, items, threads: int) -> Iterator:
    """``map(fn, items)`` in order on ``threads`` threads, at most 2 per thread ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as ex:
        ahead: deque = deque()
        for item in items:
            ahead.append(ex.submit(fn, item))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


class WorkerPool:
    """``n`` processes that each build ``work = init(*args)`` and apply it to tasks; results
    come back in task order.

    Unlike ``multiprocessing.Pool`` (which respawns a worker whose initializer raises, forever),
    start-up is a handshake: each worker reports ready or its error, and any start-up error, a
    task's exception or a dead worker raises :class:`WorkerError` with that error in one line.
    Processes are forked where the platform can (``init`` then needs no pickling and a tokenizer
    built before the pool is shared), else spawned. Each process serves tasks on ``threads``
    threads (``work`` must then be thread-safe).
    """

    def __init__(self, n: int, init: Callable, args: tuple = (), *, threads: int = 1,
                 poll_s: float = 0.2):
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._poll_s, self._threads = poll_s, threads
        self._procs = [ctx.Process(target=_worker_main, args=(init, args, self._tasks,
                                                              self._results, threads),
                                   daemon=True)
                       for _ in range(n)]
        try:
            for p in self._procs:
                p.start()
            for _ in range(n):
                kind, pid, err = self._get()
                if kind == "init-error":
                    raise WorkerError(f"worker start-up failed (pid {pid}): {err}")
        except BaseException:
            self.close()
            raise

    def _get(self):
        while True:
            try:
                return self._results.get(timeout=self._poll_s)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    try:  # a worker that reported an error and exited: read its report
                        return self._results.get(timeout=1.0)
                    except queue.Empty:
                        p = dead[0]
                        raise WorkerError(f"worker process {p.pid} died (exit code "
                                          f"{p.exitcode})") from None

    def imap(self, tasks, max_ahead: int | None = None) -> Iterator:
        """Results of ``tasks`` in order, with at most ``max_ahead`` tasks queued or done but
        not yet yielded (default 2 per worker + 2)."""
        limit = max_ahead or 2 * len(self._procs) * self._threads + 2
        it, pending, nxt, queued, exhausted = enumerate(tasks), {}, 0, 0, False
        while True:
            while not exhausted and queued + len(pending) < limit:
                try:
                    i, task = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self._tasks.put((i, task))
                queued += 1
            if queued == 0 and not pending:
                return
            if nxt not in pending:
                kind, i, payload = self._get()
                if kind != "ok":
                    raise WorkerError(f"worker failed: {payload}")
                pending[i] = payload
                queued -= 1
            while nxt in pending:
                yield pending.pop(nxt)
                nxt += 1

    def close(self) -> None:
        """Stop every worker (at once: pending work is abandoned)."""
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            if p.pid is not None:
                p.join(timeout=5)
        self._tasks.cancel_join_thread()
        self._tasks.close()
        self._results.close()


def _build_processor(cfg: PreprocessConfig) -> ChunkProcessor:
    return ChunkProcessor(cfg, load_tokenizer(cfg.tokenizer))


def _same(processor: ChunkProcessor) -> ChunkProcessor:
    return processor


# ---------------------------------------------------------------- the run
def new_report(cfg: PreprocessConfig, files: list[str], tokenizer: Tokenizer) -> dict:
    return {
        "status": "running", "inputs": files, "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size, "policy": cfg.policy, "max_seq_len": cfg.max_seq_len,
        "overlong_policy": cfg.overlong, "lines_read": 0, "blank_lines": 0, "records_ok": 0,
        "records_rejected": 0, "documents_written": 0, "tokens_written": 0, "masked_tokens": 0,
        "special_token_text_records": 0, "non_utf8_lines": 0, "per_domain": {}, "rejected": [],
        "overlong_documents": [], "non_utf8": [], "input_errors": [],
    }


def preprocess(cfg: PreprocessConfig, tokenizer: Tokenizer | None = None) -> dict:
    """Run the pipeline; returns the report (also written to ``PREFIX.report.json``).

    Raises :class:`PreprocessError` (or its :class:`StrictModeError` / :class:`WorkerError`)
    when the run fails; then nothing at the output prefix opens as a dataset.
    """
    from tqdm import tqdm

    files = expand_inputs(cfg.inputs)
    try:
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the run in one line
        raise PreprocessError(f"tokenizer {cfg.tokenizer!r}: {_one_line(exc)}") from None
    processor = ChunkProcessor(cfg, tokenizer)
    report = new_report(cfg, files, tokenizer)
    report_path = cfg.output_prefix + REPORT_SUFFIX
    remove_quietly([report_path])  # a stale report must not describe this run
    start = time.perf_counter()
    pool = bar = writer = None
    try:
        writer = DocumentWriter(cfg.output_prefix, tokenizer.vocab_size, tokenizer.name)
        chunks = read_chunks(files, cfg.chunk_bytes)
        if cfg.workers > 1:  # forked before any thread (tqdm's monitor) exists here
            pool = WorkerPool(cfg.workers, _same, (processor,), threads=cfg.threads) \
                if _forks() else WorkerPool(cfg.workers, _build_processor, (cfg,),
                                            threads=cfg.threads)
            results = pool.imap(chunks)
        else:
            results = thread_map(processor, chunks, cfg.threads)
        bar = tqdm(unit="rec", disable=not cfg.progress, file=sys.stderr, smoothing=0.1)
        for res in results:
            _account(res, report, writer, cfg)
            bar.update(len(res.records))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_s=f"{report['tokens_written'] / elapsed:,.0f}", refresh=False)
        _check_outcome(cfg, report)
        if report["documents_written"] == 0:  # allow_empty: the report only
            writer.abort()
            report["status"] = "ok (no documents: no dataset written)"
        else:
            writer.finalize()
            report["status"] = "ok"
    except InputError as exc:
        report["input_errors"].append(exc.entry)
        _fail(writer, report, report_path, start, PreprocessError(f"input {exc}", report))
    except PreprocessError as exc:
        exc.report = report
        _fail(writer, report, report_path, start, exc)
    except BaseException:  # Ctrl-C, SIGTERM, a bug: leave nothing that looks like a dataset
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    report["seconds"] = round(time.perf_counter() - start, 3)
    _write_report(report, report_path)
    return report


def _forks() -> bool:
    return "fork" in mp.get_all_start_methods()


def _check_outcome(cfg: PreprocessConfig, report: dict) -> None:
    records = report["records_ok"] + report["records_rejected"]
    if report["documents_written"] == 0 and not cfg.allow_empty:
        if records == 0:
            raise PreprocessError(f"no records in the inputs ({', '.join(report['inputs'])}); "
                                  "pass --allow-empty to accept that")
        raise PreprocessError(f"no documents: all {records} records rejected; pass "
                              "--allow-empty to accept that")
    if cfg.max_reject_fraction is not None and records:
        fraction = report["records_rejected"] / records
        if fraction > cfg.max_reject_fraction:
            raise PreprocessError(f"{report['records_rejected']} of {records} records rejected "
                                  f"({fraction:.1%}), more than --max-reject-fraction "
                                  f"{cfg.max_reject_fraction:g}")


def _fail(writer: DocumentWriter | None, report: dict, report_path: str, start: float,
          exc: PreprocessError):
    if writer is not None:
        writer.abort()
    report["status"] = f"failed: {exc}"
    report["seconds"] = round(time.perf_counter() - start, 3)
    _write_report(report, report_path)
    raise exc


def _write_report(report: dict, path: str) -> None:
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _account(res: ChunkResult, report: dict, writer: DocumentWriter, cfg: PreprocessConfig):
    if res.lengths.size:
        writer.add_many(res.tokens, res.masks, res.lengths, res.meta_jsonl)
    report["overlong_documents"] += res.overlong
    for rec in res.records:
        report["lines_read"] += 1
        if rec[1] == BLANK:
            report["blank_lines"] += 1
            continue
        n, kind, rid, domain, reason, docs, tokens, masked, special, bad_byte = rec
        if bad_byte is not None:
            report["non_utf8_lines"] += 1
            report["non_utf8"].append({"file": res.source, "line": n, "byte": bad_byte})
        report["special_token_text_records"] += int(special)
        if kind == REJECTED:
            report["records_rejected"] += 1
            report["rejected"].append({"file": res.source, "line": n, "id": rid,
                                       "reason": reason})
            if cfg.strict:
                raise StrictModeError(f"--strict: {res.source}:{n}: {reason}")
            continue
        report["records_ok"] += 1
        report["documents_written"] += docs
        report["tokens_written"] += tokens
        report["masked_tokens"] += masked
        dom = report["per_domain"].setdefault(
            domain, {"records": 0, "documents": 0, "tokens": 0, "masked_tokens": 0})
        dom["records"] += 1
        dom["documents"] += docs
        dom["tokens"] += tokens
        dom["masked_tokens"] += masked


def summary_line(report: dict) -> str:
    """The one-line stderr summary of a run."""
    parts = [f"preprocess: {report['status']}; {report['lines_read']} lines, "
             f"{report['records_ok']} records ok, {report['records_rejected']} rejected, "
             f"{report['blank_lines']} blank",
             f"{report['documents_written']} documents, {report['tokens_written']:,} tokens "
             f"({report['masked_tokens']:,} trained), {len(report['overlong_documents'])} "
             f"over-long ({report['overlong_policy']})"]
    if report["non_utf8_lines"]:
        first = report["non_utf8"][0]
        parts.append(f"{report['non_utf8_lines']} non-UTF-8 lines (first {first['file']}:"
                     f"{first['line']})")
    if report["input_errors"]:
        e = report["input_errors"][0]
        parts.append(f"input error {e['file']}:{e['line']}: {e['error']}")
    parts.append(f"tokenizer {report['tokenizer']} (vocabulary {report['vocab_size']:,})")
    return "; ".join(parts)


__all__ = ["PreprocessConfig", "PreprocessError", "StrictModeError", "WorkerError",
           "WorkerPool", "preprocess", "summary_line"]
