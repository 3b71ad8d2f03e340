"""Precomputed teacher top-k for OPD: for a teacher that does not fit beside the student.

The SVA loss (DESIGN.md §4) needs from the teacher only its salient set S (top-k ids) and its
logits on S at every response position. :func:`precompute` runs a teacher once over the
preprocessed rollout documents of its domains and writes those to a *store*; OPD then reads them
(``cfg.opd.teacher_topk``: domain → store) and scores the student with
:func:`a1_kernels.sva.sva_from_topk` — no teacher in memory during training.

The store is keyed by (dataset prefix, document index), so it does not depend on packing,
blending or shuffling. Layout of ``STORE/``::

    manifest.json        format, teacher checkpoint, k, vocab sizes, domains, max_seq_len, and
                         each dataset prefix with its document count and content fingerprint
    shard_00000/         one per data-parallel rank of the precompute run
        docs.npy         [n, 4] int64: (dataset entry, document index, first row, end row)
        ids.bin          [R, k] int32   top-k token ids, descending teacher logit (ties: lower id)
        logits.bin       [R, k] float32 the teacher's logits at those ids
        positions.bin    [R]    int32   position in the document of each row

A row is a loss (masked-in) position ``t`` of a document: the one whose label is token ``t+1``
(``megatron_a1.data.dataset.build_sample``'s ``loss_mask``). Documents are truncated to
``data.max_seq_len`` as the training dataset does. The store is written to ``STORE.tmp`` and
renamed when every rank is done.

Fingerprint of a dataset prefix: sha256 of its ``.idx`` files and ``meta.jsonl``, plus the sizes
and 64 evenly spaced 4 KiB blocks of its ``.bin`` files — enough to reject a store built for
another dataset (or an older version of it), cheap for terabyte datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch

from a1_kernels.sva.from_topk import teacher_topk
from megatron_a1.data.dataset import build_sample, collate_thd
from megatron_a1.data.indexed import MASK_SUFFIX, META_SUFFIX, DocumentStore
from megatron_a1.training.opd import final_hidden, load_frozen
from megatron_a1.training.stages import _to_device

FORMAT = "megatron_a1/teacher-topk/1"
MANIFEST = "manifest.json"


class StoreMismatchError(ValueError):
    """A teacher top-k store does not fit the training run (dataset, k, vocabulary, domain)."""


def dataset_fingerprint(prefix: str, samples: int = 64, block: int = 4096) -> str:
    """Content fingerprint of a preprocessed dataset prefix (see the module docstring)."""
    h = hashlib.sha256()
    for path in (prefix + ".idx", prefix + MASK_SUFFIX + ".idx", prefix + META_SUFFIX):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    for path in (prefix + ".bin", prefix + MASK_SUFFIX + ".bin"):
        size = os.path.getsize(path)
        h.update(str(size).encode())
        with open(path, "rb") as f:
            for off in sorted({(size - block) * i // max(1, samples - 1) for i in range(samples)}):
                f.seek(max(0, off))
                h.update(f.read(block))
    return h.hexdigest()


def response_positions(tokens: np.ndarray, mask: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Loss positions of one document as training sees it: ``t`` with ``mask[t+1]`` (truncated)."""
    m = np.asarray(mask[:max_seq_len])
    return (np.flatnonzero(m[1:]) if len(m) > 1 else np.zeros(0, np.int64)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class TeacherTopkStore:
    """Read side: ``bind`` to the run's dataset prefixes, then ``gather`` per micro-batch."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no {MANIFEST}; not a teacher top-k store (build one "
                                    "with tools/precompute_teacher_topk.py)") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreMismatchError(f"{path}: format {self.manifest.get('format')!r}, "
                                     f"expected {FORMAT!r}")
        self.k = int(self.manifest["k"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.domains = list(self.manifest["domains"])
        self.datasets = self.manifest["datasets"]
        # per dataset entry: document -> (shard, first row, end row); shard -1: not in the store
        self._where = [np.full((d["documents"], 3), -1, dtype=np.int64) for d in self.datasets]
        self._shards = []
        for s, shard in enumerate(self.manifest["shards"]):
            root, rows = os.path.join(path, shard["dir"]), shard["rows"]
            docs = np.load(os.path.join(root, "docs.npy")).reshape(-1, 4)
            for entry, doc, r0, r1 in docs:
                self._where[entry][doc] = (s, r0, r1)
            self._shards.append(tuple(
                np.memmap(os.path.join(root, name), dtype=dt, mode="r", shape=shape)
                if rows else np.zeros(shape, dtype=dt)
                for name, dt, shape in (("ids.bin", np.int32, (rows, self.k)),
                                        ("logits.bin", np.float32, (rows, self.k)),
                                        ("positions.bin", np.int32, (rows,)))))
        self._entry_of: dict[int, int] = {}

    def bind(self, prefixes: list[str], domains: list[str] | None = None) -> None:
        """Map the run's ``data.prefixes`` (dataset_id = index) to the store's datasets.

        Matching is by content fingerprint, so a moved dataset still matches and a changed or
        different one does not. A prefix holding documents of ``domains`` (default: the store's)
        with no matching dataset in the store is an error.
        """
        domains = set(domains or self.domains)
        by_print = {d["fingerprint"]: j for j, d in enumerate(self.datasets)}
        self._entry_of = {}
        for k, prefix in enumerate(prefixes):
            fp = dataset_fingerprint(prefix)
            if fp in by_print:
                self._entry_of[k] = by_print[fp]
                continue
            with open(prefix + META_SUFFIX, encoding="utf-8") as f:
                served = sum(json.loads(line)["domain"] in domains for line in f)
            if served:
                built = ", ".join(f"{d['prefix']} ({d['documents']} documents)"
                                  for d in self.datasets)
                raise StoreMismatchError(
                    f"teacher top-k store {self.path} was built for {built}, not for "
                    f"data.prefixes[{k}]={prefix} ({served} documents of {sorted(domains)}; "
                    "its fingerprint matches none of the store's datasets): rebuild the store "
                    "for this dataset with tools/precompute_teacher_topk.py")

    def document(self, dataset_id: int, doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions [n], ids [n, k], logits [n, k]) of one document of the bound dataset."""
        if dataset_id not in self._entry_of:
            raise StoreMismatchError(f"{self.path}: dataset {dataset_id} is not bound to this "
                                     "store (call bind with the run's data.prefixes)")
        entry = self._entry_of[dataset_id]
        s, r0, r1 = (int(x) for x in self._where[entry][doc])
        if s < 0:
            raise StoreMismatchError(
                f"{self.path}: document {doc} of {self.datasets[entry]['prefix']} is not in the "
                f"store (built for domains {self.domains})")
        ids, logits, positions = self._shards[s]
        return positions[r0:r1], ids[r0:r1], logits[r0:r1]

    def gather(self, batch: dict, rows: torch.Tensor, topk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ids [R, topk] (int64) and logits [R, topk] (fp32) at ``rows`` of a THD pack.

        ``rows`` (sorted, [R]) index the pack's tokens; each must be a stored loss position of
        its document (``batch["doc_ids"]`` gives (dataset_id, document) per ``cu_seqlens``
        segment). The first ``topk`` of the stored k are the top-``topk``.
        """
        if topk > self.k:
            raise StoreMismatchError(f"{self.path} holds the teacher's top-{self.k}; "
                                     f"opd.topk={topk} needs at least that many")
        cu = batch["cu_seqlens"].cpu().numpy()
        rows_np = rows.cpu().numpy()
        doc_of = np.searchsorted(cu, rows_np, side="right") - 1
        ids = np.empty((len(rows_np), topk), dtype=np.int64)
        logits = np.empty((len(rows_np), topk), dtype=np.float32)
        for i in np.unique(doc_of):
            sel = np.flatnonzero(doc_of == i)
            dataset_id, doc = batch["doc_ids"][i]
            positions, d_ids, d_logits = self.document(int(dataset_id), int(doc))
            want = rows_np[sel] - cu[i]
            at = np.searchsorted(positions, want)
            if (at >= len(positions)).any() or (positions[np.minimum(at, len(positions) - 1)]
                                                 != want).any():
                raise StoreMismatchError(
                    f"{self.path}: document {doc} of dataset {dataset_id} has loss positions "
                    "the store does not hold (was it built with another data.max_seq_len?)")
            ids[sel] = d_ids[at, :topk]
            logits[sel] = d_logits[at, :topk]
        return torch.from_numpy(ids), torch.from_numpy(logits)


def build_stores(cfg, vocab_size: int) -> dict[str, TeacherTopkStore]:
    """Domain → bound store for ``cfg.opd.teacher_topk`` (one object per distinct path).

    ``vocab_size``: the student's LM-head rows (padded); the store's vocabulary must be
    ``opd.real_vocab_size`` when set, else that.
    """
    by_path: dict[str, TeacherTopkStore] = {}
    stores = {}
    want_vocab = cfg.opd.real_vocab_size or vocab_size
    for domain, path in sorted(cfg.opd.teacher_topk.items()):
        if path not in by_path:
            store = TeacherTopkStore(path)
            served = sorted(d for d, p in cfg.opd.teacher_topk.items() if p == path)
            missing = set(served) - set(store.domains)
            if missing:
                raise StoreMismatchError(f"opd.teacher_topk: {path} was built for domains "
                                         f"{store.domains}, not {sorted(missing)}")
            if store.vocab_size != want_vocab:
                raise StoreMismatchError(f"opd.teacher_topk.{domain}: {path} ranks a vocabulary of "
                                         f"{store.vocab_size}, this run {want_vocab} "
                                         "(opd.real_vocab_size or the model's vocab_size)")
            if store.k < cfg.opd.topk:
                raise StoreMismatchError(f"opd.teacher_topk.{domain}: {path} holds the top-"
                                         f"{store.k}, opd.topk={cfg.opd.topk} needs more")
            store.bind(cfg.data.prefixes, served)
            by_path[path] = store
        stores[domain] = by_path[path]
    return stores


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _packs(items: list[tuple[int, int, int]], capacity: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive (entry, doc, length) items into packs of at most ``capacity`` tokens."""
    packs, cur, used = [], [], 0
    for it in items:
        if cur and used + it[2] > capacity:
            packs.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += it[2]
    return packs + ([cur] if cur else [])


class _ShardWriter:
    def __init__(self, root: str):
        os.makedirs(root)
        self.root, self.rows, self.docs = root, 0, []
        self._files = {n: open(os.path.join(root, n), "wb")
                       for n in ("ids.bin", "logits.bin", "positions.bin")}

    def add(self, entry: int, doc: int, positions, ids: torch.Tensor, logits: torch.Tensor):
        self._files["ids.bin"].write(ids.to(torch.int32).cpu().numpy().tobytes())
        self._files["logits.bin"].write(logits.float().cpu().numpy().tobytes())
        self._files["positions.bin"].write(np.asarray(positions, np.int32).tobytes())
        self.docs.append((entry, doc, self.rows, self.rows + len(positions)))
        self.rows += len(positions)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        np.save(os.path.join(self.root, "docs.npy"), np.asarray(self.docs, np.int64).reshape(-1, 4))


def precompute(cfg, teacher: str, domains: list[str], output: str, *, topk: int | None = None,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Run ``teacher`` over the documents of ``domains`` in ``cfg.data.prefixes``; write the store.

    ``cfg`` is a training config: its model section (preset, overrides, backend, bf16) and
    parallel layout build the teacher, ``data.max_seq_len`` bounds the packs the teacher runs on
    (and truncates documents, as training does), ``opd.topk``/``opd.real_vocab_size``/
    ``opd.chunk_size`` give k, the vocabulary and the logits chunk. Runs on every rank of the
    launch (torchrun): data-parallel ranks take every dp-th document, tensor-parallel ranks share
    theirs and exchange vocab shards. Returns the manifest on rank 0, {} elsewhere.
    """
    from megatron.core import parallel_state

    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.training.model_setup import build_model_chunks

    p = cfg.parallel
    if p.pipeline_parallel > 1 or p.context_parallel > 1:
        raise ValueError("precompute runs the teacher with pipeline_parallel=1 and "
                         "context_parallel=1 (as OPD does)")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists (pass overwrite=True / --overwrite to replace it)")
    k = topk or cfg.opd.topk
    rt = initialize(cfg.parallel, seed=cfg.train.seed)
    try:
        model = load_frozen(cfg, rt, teacher, build_model_chunks)
        weight = getattr(model, "module", model).output_layer.weight
        tp_group = parallel_state.get_tensor_model_parallel_group() if p.tensor_parallel > 1 \
            else None
        vocab_size = cfg.opd.real_vocab_size or weight.shape[0] * p.tensor_parallel
        dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                       parallel_state.get_data_parallel_rank())
        writes = parallel_state.get_tensor_model_parallel_rank() == 0
        tmp = output + ".tmp"
        if rt.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        torch.distributed.barrier()

        docs = [DocumentStore(prefix) for prefix in cfg.data.prefixes]
        items = [(j, d, min(int(s.lengths[d]), cfg.data.max_seq_len))
                 for j, s in enumerate(docs) for d in range(len(s))
                 if s.meta[d]["domain"] in domains]
        mine = _packs(items[dp_rank::dp], cfg.data.max_seq_len)
        # every rank runs the same number of forwards (EP/TP collectives): pad with empty ones
        n = torch.tensor([len(mine)], dtype=torch.int64, device=rt.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        pad = p.tensor_parallel if p.tensor_parallel > 1 else None
        writer = _ShardWriter(os.path.join(tmp, f"shard_{dp_rank:05d}")) if writes else None
        bar = _progress(progress and rt.rank == 0, sum(len(x) for x in mine), output)
        for i in range(int(n)):
            pack = mine[i] if i < len(mine) else []
            _score_pack(pack, docs, model, weight, k, vocab_size, tp_group, cfg, pad, writer)
            bar.update(len(pack))
        bar.close()
        if writer is not None:
            writer.close()
        torch.distributed.barrier()

        if rt.rank != 0:
            torch.distributed.barrier()
            return {}
        manifest = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "teacher": os.path.abspath(teacher),
            "model": {"preset": cfg.model.preset, "overrides": cfg.model.overrides},
            "k": k, "vocab_size": vocab_size,
            "padded_vocab_size": weight.shape[0] * p.tensor_parallel,
            "domains": sorted(domains), "max_seq_len": cfg.data.max_seq_len,
            "datasets": [{"prefix": os.path.abspath(prefix), "documents": len(s),
                          "served_documents": sum(1 for it in items if it[0] == j),
                          "fingerprint": dataset_fingerprint(prefix)}
                         for j, (prefix, s) in enumerate(zip(cfg.data.prefixes, docs))],
        }
        shards = sorted(x for x in os.listdir(tmp) if x.startswith("shard_"))
        manifest["shards"] = [
            {"dir": s, "rows": int(np.load(os.path.join(tmp, s, "docs.npy"))[:, 3].max(initial=0))}
            for s in shards]
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(output):  # --overwrite: swap the old store out, then delete it
            shutil.rmtree(output + ".old", ignore_errors=True)
            os.replace(output, output + ".old")
        os.replace(tmp, output)
        shutil.rmtree(output + ".old", ignore_errors=True)
        torch.distributed.barrier()
        return manifest
    finally:
        destroy()


def _score_pack(pack, docs, model, weight, k, vocab_size, tp_group, cfg, pad, writer) -> None:
    """Teacher forward on one pack of documents, top-k at every loss position, write them."""
    if pack:
        toks = [np.asarray(docs[j].tokens(d), np.int64)[:cfg.data.max_seq_len]
                for j, d, _ in pack]
        masks = [np.asarray(docs[j].loss_mask(d), np.float32)[:cfg.data.max_seq_len]
                 for j, d, _ in pack]
    else:  # an empty forward keeps collectives in step with ranks that have more packs
        toks, masks = [np.zeros(pad or 1, np.int64)], [np.zeros(pad or 1, np.float32)]
    sample = build_sample(toks, masks)
    sample.update(domains=[""] * len(toks), doc_ids=list(range(len(toks))), dataset_id=0)
    batch = _to_device(collate_thd([sample], pad_to_multiple=pad))
    with torch.no_grad():
        hidden = final_hidden(model, batch)
        cu = batch["cu_seqlens"].tolist()
        for i, (j, d, _) in enumerate(pack):
            pos = torch.from_numpy(response_positions(toks[i], np.asarray(
                docs[j].loss_mask(d)), cfg.data.max_seq_len))
            ids_parts, logit_parts = [], []
            for c0 in range(0, len(pos), cfg.opd.chunk_size):
                rows = pos[c0:c0 + cfg.opd.chunk_size].to(hidden.device) + cu[i]
                ids, values = teacher_topk(hidden[rows] @ weight.t(), k, vocab_size=vocab_size,
                                           tp_group=tp_group)
                ids_parts.append(ids)
                logit_parts.append(values)
            if writer is not None:
                empty = torch.zeros((0, k))
                writer.add(j, d, pos.numpy(), torch.cat(ids_parts) if ids_parts else empty,
                           torch.cat(logit_parts) if logit_parts else empty)


def _progress(enabled: bool, total: int, output: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"teacher top-k -> {os.path.basename(output)}", unit="doc",
                disable=not enabled)
