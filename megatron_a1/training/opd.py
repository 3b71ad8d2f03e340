"""Stage 3: multi-teacher on-policy distillation with the SVA loss (DESIGN.md §1, §4).

Each document of a pack (a student rollout, rendered and masked by the data pipeline: only the
student's own generated tokens count) carries a domain; that domain's teacher runs forward on
the same packed tokens without gradients, and the fused LM-head + SVA kernel
(:func:`a1_kernels.sva.fused_linear_sva`) gives the per-position loss ``ℓ_t``. The objective is
domain-normalised over the **global batch** (all micro-batches, all DP ranks):

    L = mean_{domains d present} mean_{samples i of d} mean_{t in R_i} ℓ_t  =  Σ_t w_t ℓ_t,
    w_t = 1 / (D · N_d · |R_i|)

The weights depend only on the batch's metadata (domains, response masks), so they are computed
before the forward pass (one all-reduce of per-domain sample counts over DP) and every
micro-batch contributes ``Σ_t w_t ℓ_t``. To fit megatron-core's per-token convention (gradients
summed, divided by the summed token count), each micro-batch reports its sum times
``num_microbatches · dp`` with a count of 1, so the division gives exactly ∂L.

A *sample* is one document of the pack (one trajectory under the data pipeline's ``whole``
policy, one query of it under ``split``). Teachers share the student's architecture preset and
parallel layout and live on the same ranks (memory: one extra model per distinct teacher
checkpoint, weights only, no optimizer state or gradients); pipeline parallelism is not
supported for this stage.

A teacher that does not fit beside the student is replaced by its precomputed top-k
(``opd.teacher_topk``: domain → store from ``tools/precompute_teacher_topk.py``, read by
:mod:`megatron_a1.training.teacher_topk`): the documents of those domains are scored by
:func:`a1_kernels.sva.sva_from_topk` from the stored ids and teacher logits and the student's
logits at those ids only. Same ℓ_t, same weights.

A teacher can also be served (``opd.teacher_servers``: domain → vLLM/SGLang URL,
:class:`ServedTeacher`): in ``prepare`` each rank asks the server for the top-k prompt log-probs
of its own micro-batches' documents of those domains (one request per document with loss
tokens, all of the step's in flight together), and they are scored like a store's rows. The
log-probs stand in for the teacher logits: on the salient set they differ by one constant per
position, which the renormalisation on S cancels (``a1_kernels.sva.from_topk.set_loss`` takes a
``log_softmax`` of the teacher values). The teacher may have any architecture and layout, but
must share the student's tokenizer.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from a1_kernels.sva import fused_linear_sva, sva_from_topk
from a1_kernels.sva.reference import fused_linear_sva_reference
from megatron_a1.data.dataset import packed_seq_params
from megatron_a1.training import checkpoint as ckpt


def load_frozen(cfg, rt, path: str, build_model_chunks) -> torch.nn.Module:
    """A model of the run's preset and layout with the weights of checkpoint ``path``, frozen."""
    chunks, _ = build_model_chunks(cfg, rt)
    ckpt.load_model_weights(ckpt.latest_checkpoint(path) or path, chunks)
    model = chunks[0].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teachers(cfg, rt, build_model_chunks) -> dict[str, torch.nn.Module]:
    """Domain → frozen teacher model (one model per distinct checkpoint)."""
    by_path: dict[str, torch.nn.Module] = {}
    teachers = {}
    for domain, path in sorted(cfg.opd.teachers.items()):
        if path not in by_path:
            by_path[path] = load_frozen(cfg, rt, path, build_model_chunks)
        teachers[domain] = by_path[path]
    return teachers


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The model's final-norm hidden states [T, H] for a THD pack (the LM head is skipped).

    ``HybridModel.forward`` returns the decoder output when ``post_process`` is False; the
    decoder applies its final norm by its own flag, so this is exactly the LM head's input.
    With sequence parallelism the sequence-split states are gathered.
    """
    inner = getattr(model, "module", model)
    inner.post_process = False
    try:
        hidden = model(batch["tokens"], batch["position_ids"], None,
                       packed_seq_params=packed_seq_params(batch))
    finally:
        inner.post_process = True
    if inner.config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=inner.pg_collection.tp)
    return hidden[:, 0]  # [T, 1, H] -> [T, H]


class ServedTeacher:
    """A teacher behind a vLLM/SGLang server: its top-k prompt log-probs at the loss positions.

    ``fetch`` (in :meth:`OPDStage.prepare`) requests them for the rows to score of a step's
    micro-batches and attaches them to each batch; ``gather`` reads them back, with the
    signature of :meth:`~megatron_a1.training.teacher_topk.TeacherTopkStore.gather`. Each rank
    asks for its own micro-batches (tensor-parallel ranks share theirs, so they ask the same).
    """

    KEY = "served_teacher_topk"
    """Batch key: ``{url: (rows [R], ids [R, k] int64, logprobs [R, k] float32)}``."""

    def __init__(self, url: str, backend: str, vocab_size: int, *, timeout_s: float = 600.0,
                 max_retries: int = 3, max_in_flight: int = 64):
        from megatron_a1.rollout.http import HTTPEngine

        self.url, self.vocab_size = url, vocab_size
        self.engine = HTTPEngine(url, backend=backend, timeout_s=timeout_s,
                                 max_retries=max_retries, max_in_flight=max_in_flight)

    def fetch(self, batches: list[dict], rows: list[torch.Tensor], topk: int) -> None:
        """Ask the server about every document holding some of ``rows[b]`` (sorted [R_b] indices
        into batch ``b``'s pack) and attach the teacher's top-``topk`` at those rows.

        A row is a loss position ``t`` of its document, the one whose label is token ``t + 1``;
        the server's row ``t`` predicts exactly that token. A document is sent up to its last
        such position's label: later tokens cannot change the rows scored.
        """
        docs = []  # (batch, first pack row of the document, its positions to score)
        for b, (batch, r) in enumerate(zip(batches, rows)):
            cu, r = batch["cu_seqlens"].cpu().numpy(), r.cpu().numpy()
            doc_of = np.searchsorted(cu, r, side="right") - 1
            for i in np.unique(doc_of):
                pos = r[doc_of == i] - cu[i]
                if pos[-1] + 1 >= cu[i + 1] - cu[i]:
                    raise ValueError(f"document {i} of a micro-batch has a loss position without "
                                     "a next token (its label)")
                docs.append((b, int(cu[i]), pos))
        answers = self.engine.prompt_topk(
            [batches[b]["tokens"][0, s:s + int(pos[-1]) + 2].tolist() for b, s, pos in docs], topk)
        for b, (batch, r) in enumerate(zip(batches, rows)):
            ids = [np.zeros((0, topk), np.int64)]
            logprobs = [np.zeros((0, topk), np.float32)]
            for (d_b, _, pos), (d_ids, d_logprobs) in zip(docs, answers):
                if d_b == b:  # documents in pack order, so rows stay in order
                    self._check_vocab(d_ids)
                    ids.append(d_ids[pos])
                    logprobs.append(d_logprobs[pos])
            batch.setdefault(self.KEY, {})[self.url] = (
                r.cpu(), torch.from_numpy(np.concatenate(ids)),
                torch.from_numpy(np.concatenate(logprobs)))

    def gather(self, batch: dict, rows: torch.Tensor, topk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ids [R, topk] (int64) and log-probs [R, topk] (fp32) at ``rows`` (the rows
        ``fetch`` was given for this batch)."""
        fetched, ids, logprobs = batch[self.KEY][self.url]
        if not torch.equal(fetched, rows.cpu()) or ids.shape[1] != topk:
            raise RuntimeError(f"teacher server {self.url}: the micro-batch's rows or k changed "
                               "after prepare")
        return ids, logprobs

    def _check_vocab(self, ids: np.ndarray) -> None:
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"teacher server {self.url} returned token id {int(ids.max())}, outside the "
                f"student's vocabulary of {self.vocab_size} (opd.real_vocab_size, else the "
                "model's vocab_size): does it serve a model with the student's tokenizer?")


def build_servers(cfg, vocab_size: int) -> dict[str, ServedTeacher]:
    """Domain → :class:`ServedTeacher` for ``cfg.opd.teacher_servers`` (one per distinct URL).

    ``vocab_size``: the student's LM-head rows (padded); ids must be below
    ``opd.real_vocab_size`` when set, else below that.
    """
    by_url: dict[str, ServedTeacher] = {}
    vocab = cfg.opd.real_vocab_size or vocab_size
    for domain, url in sorted(cfg.opd.teacher_servers.items()):
        if url not in by_url:
            by_url[url] = ServedTeacher(url, cfg.opd.teacher_server_backend, vocab)
    return {d: by_url[u] for d, u in cfg.opd.teacher_servers.items()}


class OPDStage:
    """``forward_step`` for megatron-core's schedules, plus ``prepare`` for the domain weights."""

    name = "opd"

    def __init__(self, cfg, rt, teachers: dict[str, torch.nn.Module], vocab_size: int | None,
                 stores: dict | None = None, servers: dict | None = None):
        """``teachers``: domain → co-located model; ``stores``: domain → bound
        :class:`~megatron_a1.training.teacher_topk.TeacherTopkStore`; ``servers``: domain →
        :class:`ServedTeacher`; a domain is in one."""
        self.cfg, self.teachers, self.vocab_size = cfg, teachers, vocab_size
        self.stores, self.servers = stores or {}, servers or {}
        kinds = (self.teachers, self.stores, self.servers)
        twice = sorted(d for i, a in enumerate(kinds) for b in kinds[i + 1:]
                       for d in set(a) & set(b))
        if twice:
            raise ValueError(f"domains {twice} have more than one teacher (co-located, top-k "
                             "store, server)")
        self.domains = sorted({**self.teachers, **self.stores, **self.servers})
        self.teacher_groups = self._group(self.teachers)
        # (served teacher, its domains): their top-k is fetched in ``prepare``
        self.server_groups = self._group(self.servers)
        # teachers known by their top-k only (precomputed or served): scored alike
        self.topk_groups = self._group(self.stores) + self.server_groups
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.metrics: dict = {}

    def prepare(self, micro_batches: list[dict]) -> None:
        """Attach ``sva_weight`` [T] (the w_t above) to each micro-batch of this step, and the
        served teachers' top-k at the rows they score (:meth:`ServedTeacher.fetch`)."""
        dp_group = parallel_state.get_data_parallel_group()
        responses = [self._response_counts(b) for b in micro_batches]
        counts = torch.zeros(len(self.domains), dtype=torch.float64)
        for b, per_doc in zip(micro_batches, responses):
            for d, n_resp in zip(b["domains"], per_doc):
                if d not in self.domains:
                    raise KeyError(f"document domain {d!r} has no teacher; opd.teachers, "
                                   f"opd.teacher_topk and opd.teacher_servers have "
                                   f"{self.domains}")
                if n_resp:
                    counts[self.domains.index(d)] += 1
        torch.distributed.all_reduce(counts, group=dp_group)
        present = int((counts > 0).sum())
        scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
        for b, per_doc in zip(micro_batches, responses):
            cu, mask = b["cu_seqlens"], b["loss_mask"][0]
            w = torch.zeros_like(mask)
            for i, (d, n_resp) in enumerate(zip(b["domains"], per_doc)):
                if n_resp:
                    s, e = int(cu[i]), int(cu[i + 1])
                    w[s:e] = mask[s:e] / (present * counts[self.domains.index(d)] * n_resp)
            b["sva_weight"], b["sva_scale"] = w, scale
        for server, domains in self.server_groups:
            server.fetch(micro_batches, [self._rows_of(b, domains).nonzero().squeeze(1)
                                         for b in micro_batches], self.cfg.opd.topk)
        self.metrics = {f"samples/{d}": float(c) for d, c in zip(self.domains, counts)}
        self._present = present
        self._domain_loss = torch.zeros(len(self.domains), dtype=torch.float64)

    def finish(self, step) -> None:
        """Per-domain loss of the step: D · Σ_{t in d} w_t ℓ_t = mean over d's samples of their
        mean token loss (the step's loss is the mean of these over the domains present)."""
        sums = self._domain_loss.clone()
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        for i, d in enumerate(self.domains):
            if self.metrics[f"samples/{d}"]:
                self.metrics[f"loss/{d}"] = float(sums[i]) * self._present

    @staticmethod
    def _response_counts(batch: dict) -> list[int]:
        cu, mask = batch["cu_seqlens"], batch["loss_mask"][0]
        n_docs = len(batch["domains"])
        return [int(mask[int(cu[i]):int(cu[i + 1])].sum()) for i in range(n_docs)]

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        student = final_hidden(model, batch)
        w_s = getattr(model, "module", model).output_layer.weight
        # Every teacher runs on every micro-batch, in the same order on every rank: a teacher's
        # forward holds collectives (EP alltoall, TP), so ranks must agree on which teachers run
        # even when their micro-batches hold different domains. Tokens of documents routed to
        # other teachers are masked out of each teacher's SVA call.
        token_loss = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        for path_model, domains in self.teacher_groups:
            with torch.no_grad():
                teacher = final_hidden(path_model, batch)
            token_loss = token_loss + self._sva(student, teacher, w_s,
                                                path_model.output_layer.weight, batch, domains)
        for source, domains in self.topk_groups:
            token_loss = token_loss + self._sva_from_topk(student, w_s, source, batch, domains)
        weight = batch["sva_weight"]
        weighted = token_loss * weight
        loss_sum = weighted.sum() * batch["sva_scale"]
        self._log_domain_loss(weighted.detach(), batch)
        one = torch.ones((), dtype=torch.int)
        return loss_sum, lambda out: (out, one, {"loss": torch.stack([out.detach(),
                                                                      one.float()])})

    def _log_domain_loss(self, weighted: torch.Tensor, batch: dict) -> None:
        cu = batch["cu_seqlens"].tolist()
        per_doc = torch.stack([weighted[cu[i]:cu[i + 1]].sum()
                               for i in range(len(batch["domains"]))]).double().cpu()
        for d, loss in zip(batch["domains"], per_doc):
            if d in self.domains:
                self._domain_loss[self.domains.index(d)] += loss

    @staticmethod
    def _group(by_domain: dict) -> list[tuple[object, set[str]]]:
        """Distinct teachers (models or stores) with the domains routed to each, in fixed order."""
        groups: dict[int, tuple[object, set[str]]] = {}
        for d in sorted(by_domain):
            m = by_domain[d]
            groups.setdefault(id(m), (m, set()))[1].add(d)
        return sorted(groups.values(), key=lambda g: min(g[1]))

    @staticmethod
    def _rows_of(batch, domains: set[str]) -> torch.Tensor:
        """[T] bool: the weighted positions of the pack's documents of ``domains``."""
        cu, mask = batch["cu_seqlens"], torch.zeros_like(batch["sva_weight"], dtype=torch.bool)
        for i, d in enumerate(batch["domains"]):
            if d in domains:
                mask[int(cu[i]):int(cu[i + 1])] = True
        return mask & (batch["sva_weight"] > 0)

    def _reduce_hidden_grad(self, w_s) -> bool:
        # with sequence parallelism the gather's backward already sums the partial hidden
        # gradients over TP
        return (not getattr(w_s, "sequence_parallel", False)
                and not self.cfg.parallel.sequence_parallel)

    def _sva_from_topk(self, student, w_s, source, batch, domains: set[str]):
        """ℓ_t of the documents of ``domains`` from a teacher known by its top-k: a store
        (ids, logits) or a server (ids, log-probs, which ``sva_from_topk`` takes as logits)."""
        rows = self._rows_of(batch, domains).nonzero().squeeze(1)
        loss = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        if not rows.numel():  # the same on every TP rank: they share the micro-batch
            return loss
        ids, logits = source.gather(batch, rows, self.cfg.opd.topk)
        # Served log-probs are the logits minus log Z per row; sva_from_topk's set_loss takes a
        # log_softmax of the teacher values over S, which cancels any per-row constant.
        part = sva_from_topk(student[rows], w_s, ids.to(student.device), logits,
                             tp_group=self.tp_group if self.tp > 1 else None,
                             reduce_hidden_grad=self._reduce_hidden_grad(w_s),
                             chunk_size=self.cfg.opd.chunk_size)
        return loss.index_put((rows,), part)

    def _sva(self, student, teacher, w_s, w_t, batch, domains: set[str]):
        mask = self._rows_of(batch, domains)
        k = self.cfg.opd.topk
        if student.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            return fused_linear_sva(
                student, w_s, teacher, w_t, k, self.cfg.opd.chunk_size, mask=mask,
                vocab_size=self.vocab_size, tp_group=self.tp_group if self.tp > 1 else None,
                reduce_hidden_grad=self._reduce_hidden_grad(w_s),
            )
        if self.tp > 1:
            raise NotImplementedError("OPD with tensor parallelism needs the Triton SVA kernels "
                                      "(a GPU, or TRITON_INTERPRET=1 on CPU)")
        # CPU without the Triton interpreter: the plain-PyTorch oracle (same maths), on the
        # masked-in rows only (it materialises [rows, V] logits)
        rows = mask.nonzero().squeeze(1)
        loss = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        if rows.numel():
            loss = loss.index_put((rows,), fused_linear_sva_reference(
                student[rows], w_s, teacher[rows], w_t, k, vocab_size=self.vocab_size))
        return loss
