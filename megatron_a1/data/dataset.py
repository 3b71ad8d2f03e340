"""Packed-sequence datasets, weighted blends, DP-sharded resumable loading and THD collation.

    ds = build_packed_dataset(PackedDatasetConfig(prefixes=["out/search", "out/tool"],
                                                  weights=[0.3, 0.7], max_seq_len=131072,
                                                  num_samples=10_000))
    loader = build_dataloader(ds, LoaderConfig(micro_batch_size=1, dp_rank=r, dp_size=8,
                                               consumed_samples=resume_from))
    for batch in loader:      # one THD pack: tokens [1, T], cu_seqlens [n+1], ...
        params = packed_seq_params(batch)

One sample = one packed sequence (documents from one prefix, packed by
:mod:`~megatron_a1.data.packing`), a dict of

* ``tokens`` [S] int64, ``position_ids`` [S] int64 restarting at 0 in every document;
* ``labels`` [S] int64: ``tokens[t+1]`` inside a document, ``-100`` at each document's last token
  (no label crosses a document boundary);
* ``loss_mask`` [S] float32 aligned with ``labels``: the preprocessing mask of token ``t+1``,
  0 at document ends;
* ``cu_seqlens`` [n_docs+1] int32, ``max_seqlen`` int, ``domains`` and ``doc_ids`` (index of each
  document in its prefix), ``dataset_id`` (which prefix).

Sample order is a *global sample index* (megatron-core style): sample ``i`` of a blend comes from
the dataset whose realised share lags its weight most (Megatron's blending rule), at that
dataset's next packed sequence (wrapping around after an epoch). The sampler walks the global
index from ``consumed_samples`` in global batches of ``micro_batch_size * dp_size`` and gives DP
rank ``r`` the ``r``-th micro-batch of each, so the ranks together see exactly the unsharded
order, and resuming from a consumed-sample count continues it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .indexed import DocumentStore
from .packing import PackingConfig, PackingResult, pack_documents

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class PackedDatasetConfig:
    prefixes: list[str]
    """Output prefixes of preprocessing runs (e.g. one per domain)."""
    max_seq_len: int
    """Tokens per packed sequence (capacity)."""
    weights: list[float] | None = None
    """Blend weights, one per prefix (normalised); None: proportional to packed sequences."""
    num_samples: int | None = None
    """Length of the global sample index; None: the total number of packed sequences."""
    seed: int = 1234
    """Seed of the packing shuffle (dataset k uses seed + k)."""
    overlong: str = "error"
    """Documents longer than max_seq_len: error | truncate | skip (see packing.py)."""


class PackedSequenceDataset(torch.utils.data.Dataset):
    """The packed sequences of one prefix."""

    def __init__(self, prefix: str, packing: PackingConfig, dataset_id: int = 0):
        self.store = DocumentStore(prefix)
        self.dataset_id = dataset_id
        self.packing: PackingResult = pack_documents(self.store.lengths, packing)
        self.max_seq_len = packing.max_seq_len

    def __len__(self) -> int:
        return len(self.packing.bins)

    def __getitem__(self, i: int) -> dict:
        docs = self.packing.bins[i]
        toks, masks = [], []
        for d in docs:
            toks.append(np.asarray(self.store.tokens(d), dtype=np.int64)[: self.max_seq_len])
            masks.append(np.asarray(self.store.loss_mask(d), dtype=np.float32)[: self.max_seq_len])
        sample = build_sample(toks, masks)
        sample["domains"] = [self.store.meta[d]["domain"] for d in docs]
        sample["doc_ids"] = list(docs)
        sample["dataset_id"] = self.dataset_id
        return sample


def build_sample(tokens: list[np.ndarray], token_masks: list[np.ndarray]) -> dict:
    """Concatenate documents into one packed sample (see the module docstring for the keys)."""
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("empty document in a pack")
    cu = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(tokens)
    mask = np.concatenate(token_masks).astype(np.float32)
    labels = np.full_like(flat, IGNORE_INDEX)
    loss_mask = np.zeros_like(mask)
    labels[:-1] = flat[1:]
    loss_mask[:-1] = mask[1:]
    ends = cu[1:] - 1  # each document's last token predicts nothing
    labels[ends] = IGNORE_INDEX
    loss_mask[ends] = 0.0
    position_ids = np.arange(len(flat), dtype=np.int64) - np.repeat(cu[:-1], lengths)
    return {
        "tokens": torch.from_numpy(flat),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(lengths.max()),
    }


def blend_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index, sample_index)`` per global sample: each sample goes to the dataset whose
    count lags ``weight * (i + 1)`` the most (ties: lowest index); sample_index counts within it."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("blend weights must be non-negative with a positive sum")
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    dataset_index = np.empty(num_samples, dtype=np.int64)
    sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        d = int(np.argmax(w * (i + 1) - counts))
        dataset_index[i] = d
        sample_index[i] = counts[d]
        counts[d] += 1
    return dataset_index, sample_index


class BlendedPackedDataset(torch.utils.data.Dataset):
    """A weighted blend of :class:`PackedSequenceDataset`\\ s under one global sample index."""

    def __init__(self, datasets: list[PackedSequenceDataset], weights, num_samples: int):
        if any(len(d) == 0 for d in datasets):
            raise ValueError("a blended dataset is empty")
        self.datasets = datasets
        self.dataset_index, self.sample_index = blend_indices(weights, num_samples)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        ds = self.datasets[self.dataset_index[i]]
        return ds[int(self.sample_index[i]) % len(ds)]


def build_packed_dataset(cfg: PackedDatasetConfig) -> BlendedPackedDataset:
    """Pack every prefix and blend them (a single prefix is the identity blend)."""
    datasets = [
        PackedSequenceDataset(p, PackingConfig(max_seq_len=cfg.max_seq_len, overlong=cfg.overlong,
                                               seed=cfg.seed + k), dataset_id=k)
        for k, p in enumerate(cfg.prefixes)
    ]
    weights = cfg.weights if cfg.weights is not None else [len(d) for d in datasets]
    if len(weights) != len(datasets):
        raise ValueError(f"{len(weights)} weights for {len(datasets)} prefixes")
    num = cfg.num_samples if cfg.num_samples is not None else sum(len(d) for d in datasets)
    return BlendedPackedDataset(datasets, weights, num)


class MicroBatchSampler:
    """Megatron-style sampler: global batches of ``micro_batch_size * dp_size`` consecutive
    global indices from ``consumed_samples``; rank ``dp_rank`` gets its slice of each."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        step = micro_batch_size * dp_size
        if consumed_samples % step:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of "
                             f"micro_batch_size*dp_size={step}")
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.step, self.drop_last = micro_batch_size, dp_rank, step, drop_last

    def __len__(self) -> int:
        remaining = max(self.total - self.consumed, 0)
        return remaining // self.step if self.drop_last else -(-remaining // self.step)

    def __iter__(self):
        for start in range(self.consumed, self.total, self.step):
            batch = list(range(start, min(start + self.step, self.total)))
            if len(batch) < self.step and self.drop_last:
                return
            mine = batch[self.rank * self.mbs:(self.rank + 1) * self.mbs]
            if mine:
                yield mine


def collate_thd(samples: list[dict], pad_to_multiple: int | None = None,
                pad_token_id: int = 0) -> dict:
    """Concatenate packed samples into one THD pack with batch dim 1 and merged ``cu_seqlens``.

    With ``pad_to_multiple`` the total length is rounded up by one extra fully masked segment
    (``pad_token_id``, labels -100, loss 0, positions from 0), listed in ``cu_seqlens`` so no real
    document attends to it. ``num_padding`` reports its length.
    """
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    out = {k: torch.cat([s[k] for s in samples]) for k in keys}
    cu, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for s in samples:
        cu.append(s["cu_seqlens"][1:] + offset)
        offset += int(s["cu_seqlens"][-1])
    max_seqlen = max(s["max_seqlen"] for s in samples)
    pad = (-offset) % pad_to_multiple if pad_to_multiple else 0
    if pad:
        out["tokens"] = torch.cat([out["tokens"], torch.full((pad,), pad_token_id)])
        out["labels"] = torch.cat([out["labels"], torch.full((pad,), IGNORE_INDEX)])
        out["loss_mask"] = torch.cat([out["loss_mask"], torch.zeros(pad)])
        out["position_ids"] = torch.cat([out["position_ids"], torch.arange(pad)])
        cu.append(torch.tensor([offset + pad], dtype=torch.int32))
        max_seqlen = max(max_seqlen, pad)
    out = {k: v.unsqueeze(0) for k, v in out.items()}
    out["cu_seqlens"] = torch.cat(cu)
    out["max_seqlen"] = max_seqlen
    out["num_padding"] = pad
    out["domains"] = [d for s in samples for d in s["domains"]]
    out["doc_ids"] = [(s["dataset_id"], d) for s in samples for d in s["doc_ids"]]
    return out


def packed_seq_params(batch: dict):
    """megatron-core ``PackedSeqParams(qkv_format="thd")`` for a :func:`collate_thd` batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])


@dataclass(kw_only=True)
class LoaderConfig:
    micro_batch_size: int = 1
    """Packed sequences per micro-batch (concatenated into one THD pack)."""
    dp_rank: int = 0
    """This rank's index in its data-parallel group."""
    dp_size: int = 1
    """Data-parallel world size."""
    consumed_samples: int = 0
    """Global samples already consumed (resume point; multiple of micro_batch_size*dp_size)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    pad_to_multiple: int | None = None
    """Round each pack's length up to a multiple (e.g. TP*CP*2 for context parallelism)."""
    pad_token_id: int = 0
    """Token id of the padding segment."""


def build_dataloader(dataset, cfg: LoaderConfig) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this DP rank's THD micro-batches from ``cfg.consumed_samples`` on."""
    sampler = MicroBatchSampler(len(dataset), cfg.consumed_samples, cfg.micro_batch_size,
                                cfg.dp_rank, cfg.dp_size)
    collate = partial(collate_thd, pad_to_multiple=cfg.pad_to_multiple,
                      pad_token_id=cfg.pad_token_id)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=cfg.num_workers)
