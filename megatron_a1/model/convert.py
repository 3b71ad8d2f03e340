"""Hugging Face safetensors <-> megatron-core ``dist_checkpointing``, tensor by tensor.

    hf_to_megatron("Qwen3.5-35B-A3B/", "ckpt/")   # then load under any TP/EP/PP layout
    megatron_to_hf("ckpt/", "hf_out/")             # from a checkpoint saved under any layout

``megatron_to_hf`` takes a training checkpoint too (``megatron_a1.train``'s ``checkpoint.dir``,
which it follows to ``latest``, or one ``iter_*`` directory): only the model's tensors are read
(the optimizer's, however its format names them, are skipped), and the architecture comes from
the training config stored with it.

Both run in one process (world size 1; torch.distributed is initialised if needed). A
``dist_checkpointing`` checkpoint stores every tensor under a layout-free key with its *global*
shape, so a checkpoint written here loads under any parallel layout and one saved under any
layout converts back here.

**The mapping** (:func:`mapping`) is one table from the checkpoint's keys to the HF tensors of
``Qwen3_5MoeForCausalLM`` (``model.`` prefix; the multimodal checkpoint's
``model.language_model.`` prefix is read too), with a transform each way. Reference layer ``i``
is ``HybridModel`` layers ``2i`` (mixer) and ``2i + 1`` (MoE):

=========================================================  ===========================================
checkpoint key (``decoder.layers.{j}.`` omitted)           HF tensor (``model.layers.{i}.`` omitted)
=========================================================  ===========================================
``embedding.word_embeddings.weight``                       ``model.embed_tokens.weight``
``{2i}.input_layernorm.weight``                            ``input_layernorm.weight``
``{2i}.self_attention.in_proj.weight.{query,key,value}``   ``linear_attn.in_proj_qkv.weight`` (rows)
``{2i}.self_attention.in_proj.weight.{z,beta,alpha}``      ``linear_attn.in_proj_{z,b,a}.weight``
``{2i}.self_attention.conv1d.weight.{query,key,value}``    ``linear_attn.conv1d.weight`` (rows)
``{2i}.self_attention.{A_log,dt_bias}``                    ``linear_attn.{A_log,dt_bias}``
``{2i}.self_attention.out_norm.weight``                    ``linear_attn.norm.weight`` (not zero-centred)
``{2i}.self_attention.out_proj.weight``                    ``linear_attn.out_proj.weight``
``{2i}.self_attention.linear_qkv.weight``                  ``self_attn.{q,k,v}_proj.weight`` (permuted)
``{2i}.self_attention.{q,k}_layernorm.weight``             ``self_attn.{q,k}_norm.weight``
``{2i}.self_attention.linear_proj.weight``                 ``self_attn.o_proj.weight``
``{2i+1}.pre_mlp_layernorm.weight``                        ``post_attention_layernorm.weight``
``{2i+1}.mlp.router.weight``                               ``mlp.gate.weight``
``{2i+1}.mlp.experts.experts.linear_fc1.weight`` [E,2F,H]  ``mlp.experts.gate_up_proj`` [E,2F,H]
``{2i+1}.mlp.experts.experts.linear_fc2.weight`` [E,H,F]   ``mlp.experts.down_proj`` [E,H,F]
``{2i+1}.mlp.shared_experts.linear_fc1.weight``            ``mlp.shared_expert.{gate,up}_proj.weight``
``{2i+1}.mlp.shared_experts.linear_fc2.weight``            ``mlp.shared_expert.down_proj.weight``
``{2i+1}.mlp.shared_experts.gate_weight``                  ``mlp.shared_expert_gate.weight``
``decoder.final_norm.weight``                              ``model.norm.weight``
``output_layer.weight``                                    ``lm_head.weight``
=========================================================  ===========================================

``linear_qkv`` rows are per KV group ``[queries | gates | key | value]``; ``q_proj`` rows are
per query head ``[query | gate]``. Experts stored one tensor per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``) are read as well and written back in the same
layout. All transforms are row permutations, slices and concatenations: HF -> Megatron -> HF is
bit-exact (dtypes are kept: the original dtype of every HF tensor is recorded in the checkpoint
directory's ``hf_conversion.json``).

**Memory.** HF -> Megatron builds the model once on this process (``perform_initialization``
off: one copy of the weights, in the checkpoint's dtype) and fills it tensor by tensor from
memory-mapped safetensors, then ``dist_checkpointing.save`` writes it. Megatron -> HF never
builds a model: it reads one checkpoint key at a time and writes safetensors shards of at most
``max_shard_bytes``. Neither holds the weights twice.

Checkpoint keys are those of the local backend (``A1LocalSpecProvider``); a Transformer Engine
model fuses the pre-mixer norm into ``linear_qkv``/``in_proj`` (key ``layer_norm_weight``) and is
not covered yet.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from megatron_a1.model.config import LINEAR, A1ModelConfig

HF_CONFIG = "config.json"
SIDECAR = "hf_conversion.json"
IGNORED_HF_PREFIXES = ("mtp.", "model.visual.")
"""HF tensors that are not part of the text model (multi-token prediction head, vision tower):
skipped when converting to Megatron, listed in the sidecar."""


class ConversionError(ValueError):
    """Names every unmapped, missing and mis-shaped tensor found."""


# ----------------------------------------------------------------------------------------------
# The mapping
# ----------------------------------------------------------------------------------------------
@dataclass
class Rule:
    """One checkpoint key <-> one or more HF tensors."""

    key: str
    shape: tuple[int, ...]
    hf: list[str]
    hf_shapes: list[tuple[int, ...]]
    to_megatron: Callable[[list[torch.Tensor]], torch.Tensor] = None
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]] = None

    def __post_init__(self):
        if self.to_megatron is None:  # concatenation along rows (or a plain copy)
            sizes = [s[0] for s in self.hf_shapes]
            self.to_megatron = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, 0)
            self.to_hf = lambda t: [t] if len(sizes) == 1 else list(torch.split(t, sizes, 0))


@dataclass
class Mapping:
    """The whole table for one architecture and HF naming."""

    rules: list[Rule]
    hf_prefix: str = "model."
    per_expert: bool = False
    by_key: dict[str, Rule] = field(init=False)

    def __post_init__(self):
        self.by_key = {r.key: r for r in self.rules}

    def hf_names(self) -> dict[str, tuple[int, ...]]:
        return {n: s for r in self.rules for n, s in zip(r.hf, r.hf_shapes)}


def _qkv_rules(c: A1ModelConfig, key: str, p: str) -> Rule:
    h, nh, ng, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    npg = nh // ng

    def to_megatron(ts):
        q_proj, k_proj, v_proj = ts
        qg = q_proj.view(ng, npg, 2, hd, h)
        q, g = qg[:, :, 0].reshape(ng, npg * hd, h), qg[:, :, 1].reshape(ng, npg * hd, h)
        k, v = k_proj.view(ng, hd, h), v_proj.view(ng, hd, h)
        return torch.cat([q, g, k, v], 1).reshape(-1, h)

    def to_hf(t):
        q, g, k, v = t.view(ng, (2 * npg + 2) * hd, h).split([npg * hd, npg * hd, hd, hd], 1)
        qg = torch.stack([q.reshape(ng, npg, hd, h), g.reshape(ng, npg, hd, h)], 2)
        return [qg.reshape(nh * 2 * hd, h), k.reshape(ng * hd, h), v.reshape(ng * hd, h)]

    return Rule(
        key, ((2 * nh + 2 * ng) * hd, h),
        [f"{p}self_attn.q_proj.weight", f"{p}self_attn.k_proj.weight", f"{p}self_attn.v_proj.weight"],
        [(nh * 2 * hd, h), (ng * hd, h), (ng * hd, h)], to_megatron, to_hf,
    )


def _expert_rules(c: A1ModelConfig, m: str, p: str, per_expert: bool) -> list[Rule]:
    e, h, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
    fc1, fc2 = f"{m}mlp.experts.experts.linear_fc1.weight", f"{m}mlp.experts.experts.linear_fc2.weight"
    if not per_expert:  # transformers' fused layout is megatron's global layout
        return [
            Rule(fc1, (e, 2 * f, h), [f"{p}mlp.experts.gate_up_proj"], [(e, 2 * f, h)]),
            Rule(fc2, (e, h, f), [f"{p}mlp.experts.down_proj"], [(e, h, f)]),
        ]
    gate_up = [f"{p}mlp.experts.{x}.{w}_proj.weight" for x in range(e) for w in ("gate", "up")]
    down = [f"{p}mlp.experts.{x}.down_proj.weight" for x in range(e)]
    return [
        Rule(fc1, (e, 2 * f, h), gate_up, [(f, h)] * (2 * e),
             lambda ts: torch.stack([torch.cat(ts[i:i + 2]) for i in range(0, len(ts), 2)]),
             lambda t: [x for ex in t for x in ex.split(f)]),
        Rule(fc2, (e, h, f), down, [(h, f)] * e,
             lambda ts: torch.stack(ts), lambda t: list(t.unbind(0))),
    ]


def mapping(c: A1ModelConfig, *, hf_prefix: str = "model.", per_expert: bool = False) -> Mapping:
    """The checkpoint-key <-> HF-tensor table of architecture ``c`` (see the module docstring).

    ``hf_prefix``: ``"model."`` (``Qwen3_5MoeForCausalLM``) or ``"model.language_model."``
    (the multimodal ``Qwen3_5MoeForConditionalGeneration``). ``per_expert``: HF experts stored
    one tensor per expert instead of transformers' fused ``gate_up_proj``/``down_proj``.
    """
    h, v = c.hidden_size, c.vocab_size
    rules = [Rule("embedding.word_embeddings.weight", (v, h), [f"{hf_prefix}embed_tokens.weight"], [(v, h)])]
    nk, nv, dk, dv = (c.linear_num_key_heads, c.linear_num_value_heads,
                      c.linear_key_head_dim, c.linear_value_head_dim)
    kern = c.linear_conv_kernel_dim
    hd = c.head_dim
    for i, kind in enumerate(c.layer_types):
        p, mix, moe = f"{hf_prefix}layers.{i}.", f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}."
        rules.append(Rule(f"{mix}input_layernorm.weight", (h,), [f"{p}input_layernorm.weight"], [(h,)]))
        if kind == LINEAR:
            a, sa = f"{p}linear_attn.", f"{mix}self_attention."
            qkv_sizes = [("query", nk * dk), ("key", nk * dk), ("value", nv * dv)]
            for name, n in qkv_sizes:
                off = sum(s for nm, s in qkv_sizes[: [x for x, _ in qkv_sizes].index(name)])
                rules.append(_slice_rule(f"{sa}in_proj.weight.{name}", f"{a}in_proj_qkv.weight",
                                         (2 * nk * dk + nv * dv, h), off, n))
                rules.append(_slice_rule(f"{sa}conv1d.weight.{name}", f"{a}conv1d.weight",
                                         (2 * nk * dk + nv * dv, 1, kern), off, n))
            rules += [
                Rule(f"{sa}in_proj.weight.z", (nv * dv, h), [f"{a}in_proj_z.weight"], [(nv * dv, h)]),
                Rule(f"{sa}in_proj.weight.beta", (nv, h), [f"{a}in_proj_b.weight"], [(nv, h)]),
                Rule(f"{sa}in_proj.weight.alpha", (nv, h), [f"{a}in_proj_a.weight"], [(nv, h)]),
                Rule(f"{sa}A_log", (nv,), [f"{a}A_log"], [(nv,)]),
                Rule(f"{sa}dt_bias", (nv,), [f"{a}dt_bias"], [(nv,)]),
                Rule(f"{sa}out_norm.weight", (dv,), [f"{a}norm.weight"], [(dv,)]),
                Rule(f"{sa}out_proj.weight", (h, nv * dv), [f"{a}out_proj.weight"], [(h, nv * dv)]),
            ]
        else:
            sa, nh = f"{mix}self_attention.", c.num_attention_heads
            rules += [
                _qkv_rules(c, f"{sa}linear_qkv.weight", p),
                Rule(f"{sa}q_layernorm.weight", (hd,), [f"{p}self_attn.q_norm.weight"], [(hd,)]),
                Rule(f"{sa}k_layernorm.weight", (hd,), [f"{p}self_attn.k_norm.weight"], [(hd,)]),
                Rule(f"{sa}linear_proj.weight", (h, nh * hd), [f"{p}self_attn.o_proj.weight"], [(h, nh * hd)]),
            ]
        fs, e = c.shared_expert_intermediate_size, c.num_experts
        rules += [
            Rule(f"{moe}pre_mlp_layernorm.weight", (h,), [f"{p}post_attention_layernorm.weight"], [(h,)]),
            Rule(f"{moe}mlp.router.weight", (e, h), [f"{p}mlp.gate.weight"], [(e, h)]),
            *_expert_rules(c, moe, p, per_expert),
            Rule(f"{moe}mlp.shared_experts.linear_fc1.weight", (2 * fs, h),
                 [f"{p}mlp.shared_expert.gate_proj.weight", f"{p}mlp.shared_expert.up_proj.weight"],
                 [(fs, h), (fs, h)]),
            Rule(f"{moe}mlp.shared_experts.linear_fc2.weight", (h, fs),
                 [f"{p}mlp.shared_expert.down_proj.weight"], [(h, fs)]),
            Rule(f"{moe}mlp.shared_experts.gate_weight", (1, h), [f"{p}mlp.shared_expert_gate.weight"], [(1, h)]),
        ]
    rules += [
        Rule("decoder.final_norm.weight", (h,), [f"{hf_prefix}norm.weight"], [(h,)]),
        Rule("output_layer.weight", (v, h), ["lm_head.weight"], [(v, h)]),
    ]
    return Mapping(rules, hf_prefix, per_expert)


def _slice_rule(key, hf_name, hf_shape, offset, n) -> Rule:
    """A key that is rows ``offset:offset+n`` of one HF tensor (the other rows: other keys)."""
    return Rule(key, (n, *hf_shape[1:]), [hf_name], [hf_shape],
                lambda ts: ts[0][offset:offset + n], _RowSlice(hf_name, offset, n))


@dataclass
class _RowSlice:
    """``to_hf`` of a slice rule: a piece of a bigger HF tensor, assembled by the writer."""

    hf_name: str
    offset: int
    n: int

    def __call__(self, t):
        return [(self.offset, t)]


# ----------------------------------------------------------------------------------------------
# HF side: lazy safetensors reader, sharded writer
# ----------------------------------------------------------------------------------------------
class HFReader:
    """Names, shapes and dtypes of an HF checkpoint directory, tensors read on demand (mmap)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        self._handles = {fn: safe_open(os.path.join(path, fn), framework="pt") for fn in files}
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for fn, h in self._handles.items():
            for name in h.keys():
                sl = h.get_slice(name)
                self.where[name] = fn
                self.shapes[name] = tuple(sl.get_shape())
                self.dtypes[name] = sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)

    def config(self) -> dict:
        with open(os.path.join(self.path, HF_CONFIG)) as f:
            return json.load(f)


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards plus the index."""

    def __init__(self, path: str, max_shard_bytes: int):
        self.path, self.max_shard_bytes = path, max_shard_bytes
        os.makedirs(path, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.files):05d}.tmp.safetensors"
        save_file(self.pending, os.path.join(self.path, tmp), metadata={"format": "pt"})
        self.files.append([tmp, *self.pending])
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, *names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, final))
            weight_map.update({name: final for name in names})
        if n > 1:
            with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total},
                           "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        _world_readable(self.path)


def _world_readable(path: str) -> None:
    """0644 files in a 0755 directory: an inference server often runs as another user (the
    safetensors writer creates its files 0600)."""
    os.chmod(path, 0o755)
    for name in os.listdir(path):
        if os.path.isfile(os.path.join(path, name)):
            os.chmod(os.path.join(path, name), 0o644)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check(have: dict[str, tuple], want: dict[str, tuple], what: str, ignored=()) -> None:
    unmapped = sorted(n for n in have if n not in want and not n.startswith(tuple(ignored)))
    missing = sorted(n for n in want if n not in have)
    misshaped = sorted(f"{n}: expected {tuple(want[n])}, found {tuple(have[n])}"
                       for n in want if n in have and tuple(have[n]) != tuple(want[n]))
    if unmapped or missing or misshaped:
        parts = [f"{what} does not match the model architecture:"]
        for title, items in (("unmapped (no rule for them)", unmapped),
                             ("missing", missing), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"  {len(items)} {title}:\n    " + "\n    ".join(items))
        raise ConversionError("\n".join(parts))


def _detect_hf_layout(names) -> tuple[str, bool]:
    prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in names) else "model."
    per_expert = any(re.search(r"\.mlp\.experts\.\d+\.", n) for n in names)
    return prefix, per_expert


def _ensure_single_process():
    """torch.distributed + megatron parallel state on one process (conversion is 1-rank)."""
    import torch.distributed as dist

    from megatron_a1.runtime import initialize

    if not dist.is_initialized():
        return initialize(seed=0)
    if dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs on one process (world size 1)")
    return None


# ----------------------------------------------------------------------------------------------
# HF -> Megatron
# ----------------------------------------------------------------------------------------------
def hf_to_megatron(hf_dir: str, out_dir: str, *, dtype: torch.dtype | None = None,
                   log=print) -> A1ModelConfig:
    """Convert an HF ``qwen3_5_moe`` checkpoint directory into a ``dist_checkpointing`` one.

    ``dtype``: parameter dtype of the written checkpoint (default: the HF tensors' dtype, or
    float32 if they mix dtypes). Returns the architecture read from ``config.json``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_a1.model.build import build_model

    reader = HFReader(hf_dir)
    hf_config = reader.config()
    cfg = A1ModelConfig.from_hf_config(hf_config, name=os.path.basename(os.path.normpath(hf_dir)))
    prefix, per_expert = _detect_hf_layout(reader.shapes)
    table = mapping(cfg, hf_prefix=prefix, per_expert=per_expert)
    _check(reader.shapes, table.hf_names(), f"HF checkpoint {hf_dir}", IGNORED_HF_PREFIXES)
    ignored = sorted(n for n in reader.shapes if n.startswith(IGNORED_HF_PREFIXES))
    if ignored:
        log(f"skipping {len(ignored)} tensors outside the text model ({', '.join(IGNORED_HF_PREFIXES)})")

    used = {reader.dtypes[n] for n in table.hf_names()}
    if dtype is None:
        dtype = _ST_DTYPES[used.pop()] if len(used) == 1 else torch.float32

    rt = _ensure_single_process()
    tc = cfg.to_transformer_config(None, params_dtype=dtype, perform_initialization=False,
                                   use_cpu_initialization=True)
    model = build_model(cfg, tc, pg_collection=_pg_collection(), backend="local", max_seq_len=16)

    state = model.sharded_state_dict()
    apply_factories(state)
    cache: tuple[str, torch.Tensor] | None = None
    filled: set[str] = set()
    for sh in nested_values(state):
        if not isinstance(sh, ShardedTensor):
            continue
        rule = table.by_key.get(sh.key)
        if rule is None:
            raise ConversionError(f"model tensor {sh.key} {tuple(sh.global_shape)} has no HF rule")
        if tuple(sh.global_shape) != rule.shape:
            raise ConversionError(f"{sh.key}: model shape {tuple(sh.global_shape)} != rule {rule.shape}")
        if cache is None or cache[0] != sh.key:
            cache = (sh.key, rule.to_megatron([reader.get(n) for n in rule.hf]))
        full = cache[1]
        region = full[sh.global_slice()] if full.dim() else full
        with torch.no_grad():
            sh.data.copy_(region.reshape(sh.data.shape))
        filled.add(sh.key)
    cache = None
    unfilled = sorted(set(table.by_key) - filled)
    if unfilled:
        raise ConversionError(f"rules with no model tensor (architecture mismatch): {unfilled}")

    os.makedirs(out_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    with open(os.path.join(out_dir, SIDECAR), "w") as f:
        json.dump({"hf_config": hf_config, "hf_prefix": prefix, "per_expert": per_expert,
                   "hf_dtypes": {n: reader.dtypes[n] for n in table.hf_names()},
                   "skipped": ignored}, f, indent=1)
    del model, state
    if rt is not None:
        from megatron_a1.runtime import destroy

        destroy()
    return cfg


def _pg_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


# ----------------------------------------------------------------------------------------------
# Megatron -> HF
# ----------------------------------------------------------------------------------------------
def megatron_to_hf(ckpt_dir: str, out_dir: str, *, hf_config: dict | None = None,
                   dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                   log=print) -> A1ModelConfig:
    """Convert a ``dist_checkpointing`` checkpoint (saved under any layout) to HF safetensors.

    ``ckpt_dir``: a converted or training checkpoint, or a training ``checkpoint.dir`` (its
    ``latest`` is followed). The architecture comes from ``hf_config`` (a ``config.json`` dict),
    else from the ``hf_conversion.json`` this module wrote next to the checkpoint, else from
    the training config stored in it. Tensor dtypes: ``dtype`` if given, else the HF dtypes
    recorded at conversion, else the checkpoint's. Files are written world-readable.
    """
    cfg, hf_config, tensors = iter_hf_tensors(ckpt_dir, hf_config=hf_config, dtype=dtype)
    writer = HFWriter(out_dir, max_shard_bytes)
    count = 0
    for name, t in tensors:
        writer.add(name, t)
        count += 1
    writer.close()
    with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)
    os.chmod(os.path.join(out_dir, HF_CONFIG), 0o644)
    log(f"wrote {count} tensors ({writer.total / 2**20:.1f} MiB) to {out_dir}")
    return cfg


def iter_hf_tensors(ckpt_dir: str, *, hf_config: dict | None = None,
                    dtype: torch.dtype | None = None):
    """``(config, hf_config, tensors)``: ``tensors`` yields ``(HF name, tensor)`` of a
    ``dist_checkpointing`` checkpoint one at a time (the peak is one full tensor), for writing
    safetensors or streaming to an inference server. Arguments as :func:`megatron_to_hf`."""
    from megatron_a1.training.checkpoint import resolve_checkpoint

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise ConversionError(f"{ckpt_dir} is not a dist_checkpointing checkpoint (no "
                              "metadata.json) nor a training checkpoint.dir (no `latest`)")
    sidecar = {}
    if os.path.exists(os.path.join(ckpt_dir, SIDECAR)):
        with open(os.path.join(ckpt_dir, SIDECAR)) as f:
            sidecar = json.load(f)
    hf_config = hf_config or sidecar.get("hf_config") or _training_hf_config(ckpt_dir)
    cfg = A1ModelConfig.from_hf_config(hf_config)
    table = mapping(cfg, hf_prefix=sidecar.get("hf_prefix", "model."),
                    per_expert=sidecar.get("per_expert", False))
    return cfg, hf_config, _stream(ckpt_dir, table, sidecar.get("hf_dtypes", {}), dtype)


def _training_hf_config(ckpt_dir: str) -> dict:
    """``config.json`` of the model a training checkpoint holds (its stored ``model`` section)."""
    from megatron_a1.training.checkpoint import TRAINER_STATE

    path = os.path.join(ckpt_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        raise ConversionError(f"no architecture for {ckpt_dir}: it has neither {SIDECAR} (a "
                              f"converted checkpoint) nor {TRAINER_STATE} (a training "
                              "checkpoint); pass the HF config.json (--hf-config)")
    from megatron_a1.training.config import ModelSection
    from megatron_a1.training.model_setup import resolve_model_config

    stored = (torch.load(path, weights_only=False).get("config") or {}).get("model")
    if not stored:
        raise ConversionError(f"{path} stores no training config; pass the HF config.json "
                              "(--hf-config)")
    known = {f.name for f in fields(ModelSection)}
    return resolve_model_config(ModelSection(**{k: v for k, v in stored.items()
                                                if k in known})).to_hf_config_dict()


_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")
"""Optimizer state in a training checkpoint: ``optimizer.state.exp_avg.<model key>``
(reshardable formats), ``optimizer.distributed.*`` (bucket format), ``chained_N.`` in front of
either when megatron-core chains one optimizer per parameter kind (expert parallelism)."""


def _stream(ckpt_dir: str, table: Mapping, hf_dtypes: dict, dtype):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rt = _ensure_single_process()
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    # a training checkpoint also holds the optimizer's state: not model weights
    _check({k: tuple(v.global_shape) for k, v in meta.items() if not _OPTIMIZER_KEY.match(k)},
           {r.key: r.shape for r in table.rules}, f"checkpoint {ckpt_dir}")

    pieces: dict[str, list] = {}  # HF tensors assembled from row slices of several keys
    expected_pieces = {}
    for r in table.rules:
        if isinstance(r.to_hf, _RowSlice):
            expected_pieces[r.hf[0]] = expected_pieces.get(r.hf[0], 0) + 1

    def out(name, t):
        return name, t.to(dtype or _ST_DTYPES.get(hf_dtypes.get(name, ""), t.dtype))

    for r in table.rules:
        md = meta[r.key]
        buf = torch.empty(md.global_shape, dtype=md.dtype)
        sh = ShardedTensor.from_rank_offsets(r.key, buf, replica_id=0)
        loaded = dist_checkpointing.load({r.key: sh}, ckpt_dir, validate_access_integrity=False)
        t = loaded[r.key]
        outs = r.to_hf(t)
        if isinstance(r.to_hf, _RowSlice):
            name = r.hf[0]
            pieces.setdefault(name, []).extend(outs)
            if len(pieces[name]) == expected_pieces[name]:
                yield out(name, torch.cat([x for _, x in sorted(pieces.pop(name),
                                                                key=lambda p: p[0])]))
        else:
            for name, x in zip(r.hf, outs):
                yield out(name, x)
        del t, loaded, buf, outs
    if rt is not None:
        from megatron_a1.runtime import destroy

        destroy()

