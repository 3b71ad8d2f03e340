"""The on-disk dataset family written by preprocessing, and its reader.

For an output prefix ``P``:

* ``P.bin`` / ``P.idx`` — token ids, one sequence per document, Megatron's indexed dataset
  format written by megatron-core's ``IndexedDatasetBuilder`` (int32 for vocabularies larger
  than 65,500, else uint16), readable by ``IndexedDataset(P)``;
* ``P.loss_mask.bin`` / ``.idx`` — the 0/1 loss mask as a second indexed dataset (uint8) with
  the same sequence lengths;
* ``P.meta.jsonl`` — one JSON object per document, in order: ``domain``, ``source`` (input
  file), ``line`` (1-based), ``id``, ``query_index`` (message index of the trained query, -1 for
  policy ``whole``), ``truncated`` (original length, or null);
* ``P.report.json`` — what happened to every input line (see ``preprocess.py``).

megatron-core is imported lazily: it takes seconds to import and worker processes never need it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

MASK_SUFFIX = ".loss_mask"
META_SUFFIX = ".meta.jsonl"
REPORT_SUFFIX = ".report.json"


def output_paths(prefix: str) -> list[str]:
    """Every file a preprocessing run writes for ``prefix``."""
    return [prefix + ".bin", prefix + ".idx", prefix + MASK_SUFFIX + ".bin",
            prefix + MASK_SUFFIX + ".idx", prefix + META_SUFFIX, prefix + REPORT_SUFFIX]


def token_dtype(vocab_size: int):
    """The narrowest dtype Megatron uses for this vocabulary size."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


class DocumentWriter:
    """Appends documents (tokens, mask, metadata) to the three outputs of a prefix."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self._tokens = IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype)
        self._mask = IndexedDatasetBuilder(prefix + MASK_SUFFIX + ".bin", dtype=np.uint8)
        self._meta = open(prefix + META_SUFFIX, "w", encoding="utf-8")
        self.documents = 0

    def add(self, tokens, loss_mask, meta: dict) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        mask = np.asarray(loss_mask, dtype=np.uint8)
        if tokens.shape != mask.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and loss mask {mask.shape} differ")
        self._tokens.add_document(tokens, [tokens.size])
        self._mask.add_document(mask, [mask.size])
        self._meta.write(json.dumps(meta, ensure_ascii=False) + "\n")
        self.documents += 1

    def finalize(self) -> None:
        self._tokens.finalize(self.prefix + ".idx")
        self._mask.finalize(self.prefix + MASK_SUFFIX + ".idx")
        self._meta.close()


@dataclass
class DocumentStore:
    """Read side of a prefix: ``tokens(i)``, ``loss_mask(i)``, ``meta[i]``, ``lengths``."""

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

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[i]

    def loss_mask(self, i: int) -> np.ndarray:
        return self._mask[i]
