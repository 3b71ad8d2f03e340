"""The on-disk dataset family written by preprocessing, and its reader.

For an output prefix ``P``:

* ``P.bin`` / ``P.idx`` — token ids, one sequence per document, in Megatron's indexed dataset
  format (``MMIDIDX`` index, version 1; int32 for vocabularies larger than 65,500, else uint16),
  read by megatron-core's ``IndexedDataset(P)``;
* ``P.loss_mask.bin`` / ``.idx`` — the 0/1 loss mask as a second indexed dataset (uint8) with
  the same sequence lengths;
* ``P.meta.jsonl`` — one JSON object per document, in order: ``domain``, ``source`` (input
  file), ``line`` (1-based), ``id``, ``query_index`` (message index of the trained query, -1 for
  policy ``whole``), ``truncated`` (original length, or null);
* ``P.dataset.json`` — the dataset as a whole: ``tokenizer`` (name), ``vocab_size`` (ids it can
  produce; config validation refuses a model whose vocabulary does not match, see
  ``training/preflight.py``), ``documents``, ``tokens``;
* ``P.report.json`` — what happened to every input line (see ``preprocess.py``).

Files are written under hidden temporary names beside the prefix and renamed to these names
only once all of them are complete (``.idx`` last), so an interrupted or failed run leaves
nothing at the prefix that opens as a dataset.

The writer produces the same bytes as megatron-core's ``IndexedDatasetBuilder`` (the tests check
it) without importing megatron-core: that import pulls in torch and takes seconds, longer than
preprocessing a typical shard. The reader is megatron-core's own ``IndexedDataset``.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

MASK_SUFFIX = ".loss_mask"
META_SUFFIX = ".meta.jsonl"
DATASET_SUFFIX = ".dataset.json"
REPORT_SUFFIX = ".report.json"
# Megatron's index format: magic, version 1, then the dtype code (megatron-core's DType enum).
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}


def output_paths(prefix: str) -> list[str]:
    """Every file a preprocessing run writes for ``prefix`` (the dataset files before the
    report; ``.idx`` files last among the dataset files, as they are published)."""
    return [prefix + ".bin", prefix + MASK_SUFFIX + ".bin", prefix + META_SUFFIX,
            prefix + DATASET_SUFFIX, prefix + MASK_SUFFIX + ".idx", prefix + ".idx",
            prefix + REPORT_SUFFIX]


def token_dtype(vocab_size: int):
    """The narrowest dtype Megatron uses for this vocabulary size (its ``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def temp_path(path: str) -> str:
    """The hidden name ``path`` is written under until it is complete."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.partial")


def write_index(path: str, dtype, lengths: np.ndarray) -> None:
    """A Megatron ``.idx`` for one sequence per document of the given lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_INDEX_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", n))  # sequences
        f.write(struct.pack("<Q", n + 1))  # document boundaries: one sequence per document
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def publish(pairs: list[tuple[str, str]]) -> None:
    """Rename ``(temporary, final)`` pairs in order (callers put the ``.idx`` files last)."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def remove_quietly(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class DocumentWriter:
    """Appends documents (tokens, mask, metadata) to the outputs of a prefix.

    Nothing appears at the prefix until :meth:`finalize`; :meth:`abort` (or leaving a ``with``
    block by an exception) removes the temporary files. Any dataset previously at the prefix is
    replaced whole.
    """

    def __init__(self, prefix: str, vocab_size: int, tokenizer: str | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.vocab_size, self.tokenizer = prefix, int(vocab_size), tokenizer
        self.dtype = token_dtype(vocab_size)
        self._final = output_paths(prefix)[:-1]  # the report is the caller's
        self._tmp = [temp_path(p) for p in self._final]
        self._tokens = self._mask = self._meta = None
        try:
            self._tokens = open(self._tmp[0], "wb")
            self._mask = open(self._tmp[1], "wb")
            self._meta = open(self._tmp[2], "w", encoding="utf-8")
        except BaseException:
            self.abort()
            raise
        self._lengths: list[np.ndarray] = []
        self.documents = self.tokens = 0

    def add(self, tokens, loss_mask, meta: dict) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        mask = np.asarray(loss_mask, dtype=np.uint8)
        if tokens.shape != mask.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and loss mask {mask.shape} differ")
        self.add_many(tokens, mask, [tokens.size], json.dumps(meta, ensure_ascii=False) + "\n")

    def add_many(self, tokens: np.ndarray, masks: np.ndarray, lengths, meta_jsonl: str) -> None:
        """Append ``len(lengths)`` documents given as one flat token array and one flat mask
        array (``sum(lengths)`` each, in the writer's token dtype and uint8) and their metadata
        as JSONL text (one line each)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if tokens.dtype != self.dtype or masks.dtype != np.uint8:
            raise TypeError(f"tokens must be {np.dtype(self.dtype)}, masks uint8")
        if tokens.size != masks.size or tokens.size != lengths.sum() or \
                meta_jsonl.count("\n") != len(lengths):
            raise ValueError("tokens, masks, lengths and metadata disagree")
        if (lengths < 1).any():
            raise ValueError("empty document")
        self._tokens.write(tokens.tobytes())
        self._mask.write(masks.tobytes())
        self._meta.write(meta_jsonl)
        self._lengths.append(lengths)
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def finalize(self) -> None:
        """Write the indexes and the dataset summary, then publish every file at the prefix."""
        for f in (self._tokens, self._mask, self._meta):
            f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        write_index(self._tmp[4], np.uint8, lengths)
        write_index(self._tmp[5], self.dtype, lengths)
        with open(self._tmp[3], "w", encoding="utf-8") as f:
            json.dump({"tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                       "documents": self.documents, "tokens": self.tokens,
                       "token_dtype": np.dtype(self.dtype).name}, f, indent=1)
        remove_quietly(self._final)  # never a mix of an old and a new dataset
        try:
            publish(list(zip(self._tmp, self._final)))
        except BaseException:  # interrupted part-way: no half-published dataset either
            remove_quietly(self._final + self._tmp)
            raise

    def abort(self) -> None:
        for f in (self._tokens, self._mask, self._meta):
            if f is not None:
                f.close()
        remove_quietly(self._tmp)

    def __enter__(self) -> "DocumentWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_dataset_info(prefix: str) -> dict | None:
    """``P.dataset.json`` (tokenizer, vocab_size, ...), or None for a dataset written without
    one (by an older version or another tool)."""
    path = prefix + DATASET_SUFFIX
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class DocumentStore:
    """Read side of a prefix: ``tokens(i)``, ``loss_mask(i)``, ``meta[i]``, ``lengths``,
    ``vocab_size`` (None when the dataset does not record it)."""

    prefix: str

    def __post_init__(self):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self._tokens = IndexedDataset(self.prefix, mmap=True)
        self._mask = IndexedDataset(self.prefix + MASK_SUFFIX, mmap=True)
        self.lengths = np.asarray(self._tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self._mask.sequence_lengths):
            raise ValueError(f"{self.prefix}: token and loss-mask sequence lengths differ")
        with open(self.prefix + META_SUFFIX, encoding="utf-8") as f:
            self.meta = [json.loads(line) for line in f]
        if len(self.meta) != len(self.lengths):
            raise ValueError(f"{self.prefix}: {len(self.meta)} metadata rows for "
                             f"{len(self.lengths)} documents")
        info = read_dataset_info(self.prefix) or {}
        self.vocab_size: int | None = info.get("vocab_size")
        self.tokenizer: str | None = info.get("tokenizer")

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[i]

    def loss_mask(self, i: int) -> np.ndarray:
        return self._mask[i]
