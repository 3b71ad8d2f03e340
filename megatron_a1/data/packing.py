"""Bin-pack documents into sequences of at most ``max_seq_len`` tokens.

First-fit decreasing: documents in decreasing length (ties by document index, so the result is
deterministic), each into the lowest-numbered open sequence with room, else a new one. A segment
tree over the sequences' free space finds that sequence in O(log n), so 100K documents pack in
about a second. FFD uses at most 11/9·OPT + 6/9 sequences.

Documents longer than ``max_seq_len`` never vanish silently: they are listed in
``PackingResult.overlong`` and, per ``PackingConfig.overlong``, raise (``error``, default), get a
sequence of their own truncated to ``max_seq_len`` (``truncate``), or are left out (``skip``).
The packed sequences are then shuffled with ``seed`` (FFD emits the longest documents first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OVERLONG = ("error", "truncate", "skip")


@dataclass(kw_only=True)
class PackingConfig:
    max_seq_len: int
    """Capacity of one packed sequence, in tokens."""
    overlong: str = "error"
    """Documents longer than ``max_seq_len``: ``error``, ``truncate`` or ``skip`` (all listed)."""
    seed: int = 1234
    """Seed of the shuffle of the packed sequences."""
    shuffle: bool = True
    """Shuffle the packed sequences (else: FFD order, longest first)."""

    def __post_init__(self):
        if self.max_seq_len < 1:
            raise ValueError("max_seq_len must be positive")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}")


class OverlongDocumentError(ValueError):
    """A document is longer than ``max_seq_len`` under ``overlong="error"``."""


@dataclass
class PackingResult:
    bins: list[list[int]]
    """Document indices of each packed sequence, in document order."""
    capacity: int
    tokens: int
    """Tokens placed (after truncation)."""
    overlong: list[int] = field(default_factory=list)
    """Documents longer than the capacity (truncated or skipped per the config)."""

    @property
    def efficiency(self) -> float:
        """Real tokens / capacity of all packed sequences."""
        return self.tokens / (len(self.bins) * self.capacity) if self.bins else 1.0


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Pack ``lengths`` (each <= ``capacity``) by first-fit decreasing; bins in opening order,
    each bin's documents in ascending index order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    if lengths.max() > capacity or lengths.min() < 0:
        raise ValueError("every length must be in [0, capacity]")
    size = 1
    while size < n:
        size *= 2
    # tree[size + j] = free space of bin j (unopened bins are empty: full capacity), and every
    # inner node holds the max of its children, so the leftmost bin with room is one descent.
    tree = [capacity] * (2 * size)
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    for doc in order:
        need = int(lengths[doc])
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        j = node - size
        if j == len(bins):
            bins.append([])
        bins[j].append(doc)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def pack_documents(lengths, cfg: PackingConfig) -> PackingResult:
    """Pack documents of the given lengths; see the module docstring."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cap = cfg.max_seq_len
    overlong = [int(i) for i in np.flatnonzero(lengths > cap)]
    if overlong and cfg.overlong == "error":
        raise OverlongDocumentError(
            f"{len(overlong)} documents exceed max_seq_len={cap} (first: #{overlong[0]}, "
            f"{int(lengths[overlong[0]])} tokens); preprocess with --max-seq-len or pack with "
            "overlong='truncate'/'skip'")
    fits = np.flatnonzero(lengths <= cap)
    bins = [[int(fits[i]) for i in b] for b in first_fit_decreasing(lengths[fits], cap)]
    tokens = int(lengths[fits].sum())
    if cfg.overlong == "truncate":
        bins += [[i] for i in overlong]
        tokens += cap * len(overlong)
    if cfg.shuffle:
        perm = np.random.default_rng(cfg.seed).permutation(len(bins))
        bins = [bins[i] for i in perm]
    return PackingResult(bins=bins, capacity=cap, tokens=tokens, overlong=overlong)
