"""Packed dataset, blend, DP-sharded resumable loader and THD collation.

Oracles: per-document brute force for labels/masks/positions (a plain loop over each document
read back from the store), the unsharded sample order for DP sharding and resumption, and the
blend's target shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_a1.data.dataset import (
    IGNORE_INDEX,
    LoaderConfig,
    PackedDatasetConfig,
    build_dataloader,
    build_packed_dataset,
    collate_thd,
    packed_seq_params,
)
from megatron_a1.data.indexed import DocumentStore, DocumentWriter

MAX = 64


def _write(prefix: str, n_docs: int, domain: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = DocumentWriter(prefix, vocab_size=248_077)
    for i in range(n_docs):
        n = int(rng.integers(2, MAX + 1))
        w.add(rng.integers(0, 248_077, n), rng.integers(0, 2, n),
              {"domain": domain, "source": "synthetic", "line": i + 1, "id": f"{domain}-{i}",
               "query_index": 0, "truncated": None})
    w.finalize()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    out = []
    for k, (domain, n) in enumerate([("search", 120), ("tool", 60), ("science", 30)]):
        p = str(root / domain)
        _write(p, n, domain, seed=k)
        out.append(p)
    return out


def test_samples_match_documents_brute_force(prefixes):
    ds = build_packed_dataset(PackedDatasetConfig(prefixes=prefixes[:1], max_seq_len=MAX))
    store = DocumentStore(prefixes[0])
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        cu = s["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == len(s["tokens"]) <= MAX
        assert s["max_seqlen"] == max(b - a for a, b in zip(cu[:-1], cu[1:]))
        assert len(s["domains"]) == len(s["doc_ids"]) == len(cu) - 1
        for k, d in enumerate(s["doc_ids"]):
            toks, mask = store.tokens(d).tolist(), store.loss_mask(d).tolist()
            a, b = cu[k], cu[k + 1]
            assert s["tokens"][a:b].tolist() == toks
            for t in range(len(toks)):
                last = t == len(toks) - 1
                assert s["labels"][a + t] == (IGNORE_INDEX if last else toks[t + 1])
                assert s["loss_mask"][a + t] == (0.0 if last else float(mask[t + 1]))
                assert s["position_ids"][a + t] == t
            assert s["domains"][k] == store.meta[d]["domain"]
        seen += s["doc_ids"]
    assert sorted(seen) == list(range(len(store)))  # each document in exactly one pack


def _batches(ds, **kw):
    return [b["doc_ids"] for b in build_dataloader(ds, LoaderConfig(**kw))]


def test_dp_sharding_and_resumption_equal_unsharded_order(prefixes):
    ds = build_packed_dataset(PackedDatasetConfig(prefixes=prefixes, weights=[0.5, 0.3, 0.2],
                                                  max_seq_len=MAX, num_samples=96))
    mbs, dp = 2, 3
    full = _batches(ds, micro_batch_size=mbs * dp)  # one rank sees whole global batches
    per_rank = [_batches(ds, micro_batch_size=mbs, dp_rank=r, dp_size=dp) for r in range(dp)]
    assert all(len(r) == len(full) == 96 // (mbs * dp) for r in per_rank)
    for step, global_batch in enumerate(full):
        assert sum((per_rank[r][step] for r in range(dp)), []) == global_batch
        flat = [set(per_rank[r][step]) for r in range(dp)]
        assert not (flat[0] & flat[1]) and not (flat[1] & flat[2])  # disjoint micro-batches
    resumed = [_batches(ds, micro_batch_size=mbs, dp_rank=r, dp_size=dp,
                        consumed_samples=5 * mbs * dp) for r in range(dp)]
    assert all(resumed[r] == per_rank[r][5:] for r in range(dp))
    with pytest.raises(ValueError, match="multiple"):
        _batches(ds, micro_batch_size=mbs, dp_size=dp, consumed_samples=7)


def test_blend_weights_respected(prefixes):
    weights = [0.2, 0.5, 0.3]
    n = 1000
    ds = build_packed_dataset(PackedDatasetConfig(prefixes=prefixes, weights=weights,
                                                  max_seq_len=MAX, num_samples=n))
    counts = np.zeros(3)
    for i in range(n):
        counts[ds.dataset_index[i]] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0)
    assert [ds[i]["dataset_id"] for i in range(20)] == ds.dataset_index[:20].tolist()
    assert {d for i in range(50) for d in ds[i]["domains"]} == {"search", "tool", "science"}


def test_collate_thd_merges_and_pads(prefixes):
    ds = build_packed_dataset(PackedDatasetConfig(prefixes=prefixes[:1], max_seq_len=MAX))
    samples = [ds[0], ds[1], ds[2]]
    batch = collate_thd(samples, pad_to_multiple=128, pad_token_id=7)
    total = sum(len(s["tokens"]) for s in samples)
    pad = (-total) % 128
    assert batch["tokens"].shape == (1, total + pad) and batch["num_padding"] == pad
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[-1] == total + pad
    expected_cu, off = [0], 0
    for s in samples:
        expected_cu += (s["cu_seqlens"][1:] + off).tolist()
        off += len(s["tokens"])
    if pad:
        expected_cu.append(total + pad)
        assert batch["tokens"][0, total:].eq(7).all()
        assert batch["labels"][0, total:].eq(IGNORE_INDEX).all()
        assert batch["loss_mask"][0, total:].eq(0).all()
        assert batch["position_ids"][0, total:].tolist() == list(range(pad))
    assert cu.tolist() == expected_cu
    assert torch.equal(batch["tokens"][0, :total], torch.cat([s["tokens"] for s in samples]))
    params = packed_seq_params(batch)
    assert params.qkv_format == "thd" and torch.equal(params.cu_seqlens_q, cu)
    assert params.max_seqlen_q == batch["max_seqlen"] >= max(s["max_seqlen"] for s in samples)
