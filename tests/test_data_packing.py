"""Packing: first-fit decreasing against a naive O(n·bins) simulation and brute-force optimum;
capacity, completeness, determinism, over-long documents."""
from __future__ import annotations

import itertools
import random

import pytest

from megatron_a1.data.packing import (
    OverlongDocumentError,
    PackingConfig,
    first_fit_decreasing,
    pack_documents,
)


def naive_ffd(lengths, capacity):
    """The textbook algorithm: scan the open bins in order for each document."""
    bins, free = [], []
    for doc in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for j, room in enumerate(free):
            if room >= lengths[doc]:
                bins[j].append(doc)
                free[j] -= lengths[doc]
                break
        else:
            bins.append([doc])
            free.append(capacity - lengths[doc])
    return [sorted(b) for b in bins]


def optimal_bins(lengths, capacity):
    """Fewest bins, by trying every assignment (tiny inputs only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assign in itertools.product(range(k), repeat=n):
            loads = [0] * k
            for doc, b in enumerate(assign):
                loads[b] += lengths[doc]
            if max(loads) <= capacity and len(set(assign)) == k:
                return k
    return n


@pytest.mark.parametrize("seed", range(30))
def test_ffd_equals_naive_simulation(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 1000])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    assert first_fit_decreasing(lengths, capacity) == naive_ffd(lengths, capacity)


@pytest.mark.parametrize("seed", range(12))
def test_ffd_within_bound_of_optimum(seed):
    rng = random.Random(100 + seed)
    capacity = 10
    lengths = [rng.randint(1, 10) for _ in range(rng.randint(1, 7))]
    opt = optimal_bins(lengths, capacity)
    assert len(first_fit_decreasing(lengths, capacity)) <= 11 / 9 * opt + 6 / 9


def test_pack_is_complete_within_capacity_and_deterministic():
    rng = random.Random(7)
    lengths = [rng.randint(1, 4096) for _ in range(2000)]
    cfg = PackingConfig(max_seq_len=4096, seed=3)
    res = pack_documents(lengths, cfg)
    flat = sorted(d for b in res.bins for d in b)
    assert flat == list(range(len(lengths)))  # every document exactly once, no splitting
    assert all(sum(lengths[d] for d in b) <= 4096 for b in res.bins)
    assert res.tokens == sum(lengths)
    assert res.efficiency == sum(lengths) / (len(res.bins) * 4096) > 0.95
    assert pack_documents(lengths, cfg).bins == res.bins
    other = pack_documents(lengths, PackingConfig(max_seq_len=4096, seed=4)).bins
    assert other != res.bins and sorted(map(tuple, other)) == sorted(map(tuple, res.bins))


def test_overlong_documents_never_vanish_silently():
    lengths = [5, 50, 8, 3, 70]
    with pytest.raises(OverlongDocumentError, match="2 documents exceed"):
        pack_documents(lengths, PackingConfig(max_seq_len=10))
    skip = pack_documents(lengths, PackingConfig(max_seq_len=10, overlong="skip"))
    assert skip.overlong == [1, 4]
    assert sorted(d for b in skip.bins for d in b) == [0, 2, 3]
    trunc = pack_documents(lengths, PackingConfig(max_seq_len=10, overlong="truncate"))
    assert trunc.overlong == [1, 4] and [1] in trunc.bins and [4] in trunc.bins
    assert trunc.tokens == 5 + 8 + 3 + 10 + 10
