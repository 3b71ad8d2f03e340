"""Checks of a run before it starts: does the model fit the layout, are the datasets usable.

    problems = model_layout_problems(model_cfg, parallel, world_size, model_key="model.preset=tiny")
    problem = dataset_problem("runs/demo/data/sft", max_seq_len=1024,
                              model_vocab_size=248_320)   # None: usable

Each problem is one message naming the config key, the numbers behind it and what works.
:meth:`megatron_a1.training.config.TrainConfig.validate` runs them before any process group
exists. The layout rules, as megatron-core 0.19.2 builds our hybrid model:

* tensor parallelism splits evenly: attention heads (``TransformerConfig``), query groups — or
  TP a multiple of them, the groups then replicated (``TransformerConfig``, ``Attention``) —,
  Gated DeltaNet key and value heads (``_GDNBase`` divides them by TP with ``//``: no assert,
  wrong shapes), the vocabulary (``VocabParallelEmbedding`` and the output layer) and the
  shared expert's FFN; expert tensor parallelism splits each expert's FFN;
* experts split evenly over expert parallelism (``MoELayer``: a bare ``assert``);
* an MoE model trains tensor-parallel only with sequence parallelism (``MoELayer.forward``);
* ``HybridModel`` splits a layer pattern without ``|`` stage marks (ours: ``G``/``*`` then ``E``
  per decoder layer, twice the preset's layers) evenly over pipeline stages, and builds virtual
  pipeline stages only from ``|`` marks (``select_pipeline_segment``), which ours never has;
* context parallelism: the trainer does not split packs over context-parallel ranks, so it is
  refused rather than run on wrong inputs.

Sequence length puts no condition on the layout: every pack is padded to a multiple of TP (x 2
CP) when collated (``collate_thd``), which is what sequence parallelism needs.
"""
from __future__ import annotations

import os

from megatron_a1.model.config import LINEAR, A1ModelConfig

# Models pad their vocabulary beyond the tokenizer's (Megatron to a multiple of 128 x TP, Qwen3.5's
# 248,077 ids to 248,320 rows); a gap this large or more means another tokenizer.
MAX_VOCAB_PADDING = 1024


def _split_evenly(mc: A1ModelConfig, tp: int) -> list[str]:
    """What of ``mc`` does not split over ``tp`` tensor-parallel ranks (empty: all does)."""
    bad = []
    if mc.num_attention_heads % tp:
        bad.append(f"{mc.num_attention_heads} attention heads")
    groups = mc.num_key_value_heads
    if groups % tp and tp % groups:
        bad.append(f"{groups} query groups (num_key_value_heads; TP must divide them or be a "
                   "multiple of them)")
    if LINEAR in mc.layer_types:
        if mc.linear_num_key_heads % tp:
            bad.append(f"{mc.linear_num_key_heads} Gated DeltaNet key heads")
        if mc.linear_num_value_heads % tp:
            bad.append(f"{mc.linear_num_value_heads} Gated DeltaNet value heads")
    if mc.vocab_size % tp:
        bad.append(f"a vocabulary of {mc.vocab_size}")
    if mc.shared_expert_intermediate_size % tp:
        bad.append(f"a shared-expert FFN of {mc.shared_expert_intermediate_size}")
    return bad


def _sizes(limit: int, ok) -> str:
    return ", ".join(str(n) for n in range(1, limit + 1) if ok(n))


def model_layout_problems(mc: A1ModelConfig, p, world_size: int, *,
                          model_key: str) -> list[str]:
    """Every way the model ``mc`` does not fit the layout ``p`` (a ``ParallelConfig`` whose
    sizes passed ``validate_sizes``; ``world_size`` only sharpens the advice); ``model_key``
    names the model in messages (e.g. ``"model.preset=tiny"``)."""
    problems = []
    tp, pp, ep = p.tensor_parallel, p.pipeline_parallel, p.expert_parallel
    etp = p.expert_tensor_parallel or tp
    bad = _split_evenly(mc, tp)
    if bad:
        fits = _sizes(max(64, mc.num_attention_heads), lambda t: not _split_evenly(mc, t))
        problems.append(
            f"parallel.tensor_parallel={tp}: the model ({model_key}) has " + ", ".join(bad)
            + f", which megatron-core cannot split over {tp} tensor-parallel ranks; tensor "
            f"parallel sizes this model allows: {fits}")
    ffn = mc.moe_intermediate_size
    if ffn % etp:
        said = (f"={etp}" if p.expert_tensor_parallel else
                f" (null -> defaults to tensor_parallel={tp})")
        problems.append(
            f"parallel.expert_tensor_parallel{said}: it does not divide the experts' FFN of "
            f"{ffn} ({model_key}); set parallel.expert_tensor_parallel to one of "
            f"{_sizes(min(ffn, 64), lambda e: ffn % e == 0)}")
    if mc.num_experts % ep:
        fits = _sizes(mc.num_experts, lambda e: mc.num_experts % e == 0)
        per_replica = world_size // (etp * pp) if world_size % (etp * pp) == 0 else 0
        here = _sizes(mc.num_experts, lambda e: mc.num_experts % e == 0 and per_replica
                      and per_replica % e == 0)
        problems.append(
            f"parallel.expert_parallel={ep}: the model ({model_key}) has {mc.num_experts} "
            f"experts per MoE layer, which do not split over {ep} expert-parallel ranks "
            f"(megatron-core's MoELayer asserts num_experts % expert_parallel == 0); use a "
            f"divisor of {mc.num_experts}: {fits}"
            + (f" ({here} on {world_size} ranks)" if here else ""))
    if tp > 1 and not p.sequence_parallel:
        problems.append(
            f"parallel.sequence_parallel: the model's MoE layers train with "
            f"tensor_parallel={tp} only with sequence parallelism (megatron-core's MoELayer "
            "refuses otherwise); set parallel.sequence_parallel=true")
    layers = 2 * mc.num_layers
    if layers % pp:
        problems.append(
            f"parallel.pipeline_parallel={pp}: megatron-core's HybridModel splits the layer "
            f"pattern evenly over pipeline stages, and this model's has {layers} layers "
            f"({mc.num_layers} decoder layers x mixer + MoE, {model_key}); use one of "
            f"{_sizes(layers, lambda s: layers % s == 0)}")
    if p.virtual_pipeline_parallel is not None:
        problems.append(
            f"parallel.virtual_pipeline_parallel={p.virtual_pipeline_parallel}: megatron-core's "
            "HybridModel builds virtual pipeline stages only from a layer pattern with '|' stage "
            "marks, which the presets' patterns do not have; set "
            "parallel.virtual_pipeline_parallel=null")
    if p.context_parallel > 1:
        problems.append(
            f"parallel.context_parallel={p.context_parallel}: the trainer does not split packed "
            "sequences over context-parallel ranks (megatron-core's attention and Gated "
            "DeltaNet expect each rank to hold its share of every sequence); set "
            "parallel.context_parallel=1 (for long packs: tensor_parallel with "
            "sequence_parallel, and model.recompute)")
    return problems


def dataset_problem(prefix: str, max_seq_len: int, model_vocab_size: int | None) -> str | None:
    """Why the preprocessed dataset ``prefix`` (whose ``.idx`` exists) cannot be trained on with
    ``data.max_seq_len`` by a model of ``model_vocab_size`` embedding rows (None: the model
    config is itself invalid, vocabulary not checked), or None. Reads the index headers
    (memory-mapped) and ``.dataset.json``, not the data."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    from megatron_a1.data.indexed import MASK_SUFFIX, META_SUFFIX, read_dataset_info

    empty = (f"data.prefixes: {prefix} holds no documents (see {prefix}.report.json for why "
             "preprocessing kept none); preprocess the data again or remove the prefix")
    try:
        if os.path.getsize(prefix + ".bin") == 0:  # no tokens (and nothing to memory-map)
            return empty
        for idx in (prefix + ".idx", prefix + MASK_SUFFIX + ".idx"):
            # a reader that fails half-built complains again from its __del__: check first
            with open(idx, "rb") as f:
                if f.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
                    raise ValueError(f"{idx} is not a megatron-core index (bad header)")
        # the readers stay referenced while their lengths are read: they unmap on deletion
        tokens = IndexedDataset(prefix, mmap=True)
        mask = IndexedDataset(prefix + MASK_SUFFIX, mmap=True)
        lengths, mask_lengths = tokens.sequence_lengths, mask.sequence_lengths
        if not os.path.isfile(prefix + META_SUFFIX):
            raise FileNotFoundError(f"{prefix + META_SUFFIX} not found")
        if len(mask_lengths) != len(lengths) or (mask_lengths != lengths).any():
            raise ValueError("token and loss-mask sequence lengths differ")
        dataset_vocab = (read_dataset_info(prefix) or {}).get("vocab_size")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem
        return (f"data.prefixes: {prefix} is not a readable preprocessed dataset "
                f"({type(exc).__name__}: {exc}); run tools/preprocess_trajectories.py again")
    if len(lengths) == 0:
        return empty
    longest = int(lengths.max())
    del tokens, mask
    # a dataset that records no vocabulary (written by another tool) is not checked
    if dataset_vocab is not None and model_vocab_size is not None and \
            not dataset_vocab <= model_vocab_size < dataset_vocab + MAX_VOCAB_PADDING:
        return (f"data.prefixes: {prefix} was tokenised with a vocabulary of {dataset_vocab:,} "
                f"ids (see {prefix}.dataset.json), but the model's vocabulary has "
                f"{model_vocab_size:,} rows (it must cover every id, padded by fewer than "
                f"{MAX_VOCAB_PADDING:,}); preprocess the data with the model's tokenizer, or set "
                "model.overrides.vocab_size for this tokenizer")
    if longest > max_seq_len:
        return (f"data.max_seq_len={max_seq_len}: {prefix} has documents of up to {longest} "
                "tokens, longer than a pack; raise data.max_seq_len or preprocess with "
                f"--max-seq-len {max_seq_len} --overlong truncate")
    return None
