"""In-process incremental sampler on our own megatron-core model: the CPU/demo rollout engine.

    engine = EmbeddedEngine(model, vocab_size=tokenizer_size, seed=0)
    gens = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_tokens=256,
                                                      stop_token_ids=[im_end]))
    ...                       # a training step changes the (shared) weights in place
    engine.update_weights()   # the next generations carry the new weight_version
    top = engine.prompt_logprobs(token_ids, k=64)   # top-k next-token log-probs per position

Why not megatron-core's own inference path: 0.19.2's ``GatedDeltaNet`` raises on any
``inference_context`` (it keeps no conv or recurrent state), and its static-batching KV cache
assumes equal-length padded prompts and a core attention that takes a query shorter than the
keys, which our packed core attention does not. So this module walks the model's own layers and
calls each module's own sub-modules and weights; only the sequence-mixing maths that needs a
cache is written here:

* **attention** (``*``): the layer's ``get_query_key_value_tensors`` (QKV projection, q/k
  norms, output gate split), megatron's ``apply_rotary_pos_emb`` at each token's absolute
  position, then the new keys/values are written into a per-row KV cache and the queries attend
  to the cache (``scaled_dot_product_attention`` with a causal mask shifted by what each row has
  cached); the layer's ``_apply_output_gate`` and ``linear_proj`` finish it.
* **Gated DeltaNet** (``G``): the module's ``in_proj``, conv weights, ``_prepare_input_...``,
  ``_compute_g_and_beta``, gated output norm and ``out_proj``; the causal conv reads the last
  ``W - 1`` inputs of the row (the conv state) before the new tokens, and the delta rule starts
  from the row's ``[HV, K, V]`` state matrix: the module's chunked kernel with
  ``initial_state``/``output_final_state`` for multi-token steps (prefill), a one-token
  recurrence for decode steps.
* everything that works token by token (embedding, norms, the MoE layers ``E`` called as-is,
  the final norm, the output layer) runs unchanged on the new tokens only.

Every call processes a ragged batch: row ``r`` brings ``n_r`` new tokens (the whole prompt at
prefill, one token per decode step), packed along the sequence axis as the model's THD format.
The oracle (``tests/test_rollout_embedded.py``): each step's logits equal the full packed forward
of the same prefix.

Only model-parallel size 1 (TP = PP = EP = CP = 1) is supported: a sharded policy is served by an
HTTP engine (vLLM/SGLang, :mod:`megatron_a1.rollout.http`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.ssm.gated_delta_net import GatedDeltaNet as _UpstreamGDN
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp

from megatron_a1.model import gated_delta_rule as gdr_ops
from megatron_a1.rollout.engine import Generation, SamplingParams

__all__ = ["DecodeCache", "EmbeddedEngine", "PromptLogprobs", "sampling_probs"]


# ----------------------------------------------------------------------------------------------
# Caches and the ragged step layout
# ----------------------------------------------------------------------------------------------
@dataclass
class DecodeCache:
    """Per-row state of a batch of sequences being decoded (row = one prompt).

    Layer caches are allocated on first use, with the layer's own dtype and device.
    """

    num_rows: int
    capacity: int
    """Most tokens a row can hold (prompt + generated)."""
    lengths: list[int] = field(default_factory=list)
    """Tokens processed so far per row (the next token's position)."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Attention layer index -> keys, values ``[rows, capacity, groups, head_dim]`` (post-RoPE)."""
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    """GDN layer index -> the last ``W - 1`` conv inputs per row, ``[rows, W - 1, conv_dim]``."""
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)
    """GDN layer index -> delta-rule state ``[rows, value_heads, K, V]`` (float32)."""
    rope: torch.Tensor | None = None
    """RoPE angles of positions ``0 .. capacity - 1``, ``[capacity, 1, 1, rot_dim]``."""

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [0] * self.num_rows


@dataclass
class _Step:
    """Where the new tokens of one forward go: packed (``[T]``) and padded (``[rows, n_max]``)."""

    rows: torch.Tensor  # [Ra] cache rows taking part
    starts: torch.Tensor  # [Ra] tokens already cached per row
    counts: list[int]  # new tokens per row
    cu: torch.Tensor  # int32 [Ra + 1] packed boundaries
    tok_row: torch.Tensor  # [T] index into ``rows`` of each packed token
    tok_off: torch.Tensor  # [T] offset of the token among its row's new tokens
    pos: torch.Tensor  # [T] absolute position of each token
    n_max: int  # most new tokens of a row
    kv_len: int  # most tokens of a row once the new ones are cached

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, *D]`` packed -> ``[Ra, n_max, *D]``, zeros after each row's tokens."""
        out = x.new_zeros(len(self.counts), self.n_max, *x.shape[1:])
        out[self.tok_row, self.tok_off] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.tok_row, self.tok_off]


def _make_step(cache: DecodeCache, rows: list[int], counts: list[int], device) -> _Step:
    starts = [cache.lengths[r] for r in rows]
    for r, s, n in zip(rows, starts, counts):
        if n < 1:
            raise ValueError(f"row {r}: every row in a step needs at least one new token")
        if s + n > cache.capacity:
            raise ValueError(f"row {r}: {s} cached + {n} new tokens exceed the cache capacity "
                             f"{cache.capacity}")
    cnt = torch.tensor(counts, device=device)
    tok_row = torch.repeat_interleave(torch.arange(len(rows), device=device), cnt)
    cu = F.pad(cnt.cumsum(0), (1, 0)).to(torch.int32)
    tok_off = torch.arange(int(cnt.sum()), device=device) - cu[:-1].long()[tok_row]
    starts_t = torch.tensor(starts, device=device)
    return _Step(rows=torch.tensor(rows, device=device), starts=starts_t, counts=list(counts),
                 cu=cu, tok_row=tok_row, tok_off=tok_off, pos=starts_t[tok_row] + tok_off,
                 n_max=max(counts), kv_len=max(s + n for s, n in zip(starts, counts)))


# ----------------------------------------------------------------------------------------------
# Sequence mixers with caches
# ----------------------------------------------------------------------------------------------
def _attention_step(att: SelfAttention, x: torch.Tensor, kv, step: _Step, rope) -> tuple:
    """Self-attention of the new tokens ``x`` ``[T, 1, hidden]`` over their rows' caches."""
    cfg = att.config
    gated = cfg.attention_output_gate
    qkv = att.get_query_key_value_tensors(x, None, output_gate=gated, split_qkv=True)
    q, k, v, gate = qkv if gated else (*qkv, None)  # q [T, 1, np, hn]; k, v [T, 1, ng, hn]
    no_rope = cfg.no_rope_freq[att.layer_number - 1] if cfg.no_rope_freq else False
    if rope is not None and not no_rope:
        # The table row of each token's absolute position, laid out as a [T, 1] "sbhd" batch:
        # the same per-position rotation the packed forward applies document by document.
        freqs = rope[step.pos]
        mscale = getattr(att, "_yarn_concentration_factor", 1.0)
        q, k = (apply_rotary_pos_emb(t, freqs, config=cfg, mscale=mscale,
                                     cp_group=att.pg_collection.cp) for t in (q, k))

    keys, values = kv
    cache_rows = step.rows[step.tok_row]
    keys[cache_rows, step.pos] = k[:, 0].to(keys.dtype)
    values[cache_rows, step.pos] = v[:, 0].to(values.dtype)
    L = step.kv_len
    k_all, v_all = keys[step.rows, :L], values[step.rows, :L]  # [Ra, L, ng, hn]

    # Query i of a row sits at position start + i and sees keys 0 .. start + i (causal, shifted
    # by the row's cache). Padding queries see at least key 0, so no row is all -inf.
    q_pos = step.starts[:, None] + torch.arange(step.n_max, device=x.device)  # [Ra, n_max]
    mask = torch.arange(L, device=x.device)[None, None, :] <= q_pos[:, :, None]
    out = F.scaled_dot_product_attention(
        step.pad(q[:, 0]).transpose(1, 2), k_all.transpose(1, 2).to(q.dtype),
        v_all.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None], scale=_softmax_scale(att),
        enable_gqa=True,
    )  # [Ra, np, n_max, hn]
    out = step.unpad(out.transpose(1, 2))  # [T, np, hn]
    out = out.reshape(out.shape[0], 1, -1)
    if gate is not None:
        out = att._apply_output_gate(out, gate)
    return att.linear_proj(out)


def _softmax_scale(att: SelfAttention) -> float:
    """The scale the layer's core attention applies (ours keeps the undivided one separately,
    see ``PackedDotProductAttention``; Transformer Engine's stores ``softmax_scale``)."""
    core = att.core_attention
    for name in ("_kernel_scale", "softmax_scale"):
        scale = getattr(core, name, None)
        if scale is not None:
            return float(scale)
    return 1.0 / math.sqrt(att.hidden_size_per_attention_head)


def _gdn_step(gdn: _UpstreamGDN, x: torch.Tensor, conv_state: torch.Tensor,
              ssm_state: torch.Tensor, step: _Step) -> tuple:
    """Gated DeltaNet on the new tokens ``x`` ``[T, 1, hidden]``, updating the row states.

    Mirrors upstream ``GatedDeltaNet.forward`` (TP = CP = 1) with the conv and the delta rule
    continued from the cached states instead of started from zero.
    """
    T = x.shape[0]
    qkvzba, _ = gdn.in_proj(x)
    qkv, gate, beta, alpha = torch.split(qkvzba.transpose(0, 1), gdn.feat_dim_split, dim=-1)
    gate = gate.reshape(1, T, -1, gdn.value_head_dim)

    # Causal conv: each row's window is [W - 1 cached inputs | new inputs | zero padding]; the
    # conv never reads right of a token, so the padding cannot leak into real outputs.
    W = gdn.conv_kernel_dim
    rows_conv = torch.cat([conv_state[step.rows], step.pad(qkv[0])], dim=1)  # [Ra, W-1+n, D]
    y, _ = gdr_ops.causal_conv1d(
        rows_conv, gdn.conv1d.weight.squeeze(1), gdn.conv1d.bias if gdn.conv_bias else None,
        activation=gdn.activation,
    )
    qkv = step.unpad(y[:, W - 1:])[None]  # [1, T, D]
    # New conv state: the last W - 1 inputs of each row, i.e. rows_conv[r, n_r : n_r + W - 1].
    last = (torch.tensor(step.counts, device=x.device)[:, None]
            + torch.arange(W - 1, device=x.device))
    conv_state[step.rows] = rows_conv.gather(1, last[..., None].expand(-1, -1, qkv.shape[-1]))

    query, key, value, gate, beta, alpha = gdn._prepare_input_for_gated_delta_rule(
        qkv, gate, 1, T, beta, alpha)
    g, beta = gdn._compute_g_and_beta(gdn.A_log, gdn.dt_bias, alpha, beta)

    state = ssm_state[step.rows]
    if step.n_max == 1:  # decode: one token per row, rows on the token axis
        core, state = _delta_rule_step(query[0], key[0], value[0], g[0], beta[0], state)
        core = core[None]
    else:  # prefill / multi-token: the module's chunked kernel, one document per row
        core, state = gdn.gated_delta_rule(
            query, key, value, g=g, beta=beta, initial_state=state, output_final_state=True,
            use_qk_l2norm_in_kernel=False, cu_seqlens=step.cu,
        )
    ssm_state[step.rows] = state.to(ssm_state.dtype)

    norm_out = gdn._apply_gated_norm(core, gate).reshape(T, 1, -1)
    return gdn.out_proj(norm_out)


def _delta_rule_step(q, k, v, g, beta, state):
    """One token of the gated delta rule per row (the recurrence the chunked kernel computes).

    q, k ``[R, HV, K]`` (already L2-normalised and repeated to the value heads), v ``[R, HV, V]``,
    g, beta ``[R, HV]``, state ``[R, HV, K, V]``. Returns ``(o [R, HV, V], new state)``; float32
    arithmetic (as the kernels), output in ``v``'s dtype.
    """
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    qf, kf, vf, gf, bf = (t.to(dtype) for t in (q, k, v, g, beta))
    S = state.to(dtype) * gf.exp()[..., None, None]
    predicted = torch.einsum("rhkv,rhk->rhv", S, kf)  # S^T k
    S = S + torch.einsum("rhk,rhv->rhkv", kf * bf[..., None], vf - predicted)
    o = torch.einsum("rhkv,rhk->rhv", S, qf) * q.shape[-1] ** -0.5
    return o.to(v.dtype), S


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = -1,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution tokens are drawn from: ``softmax(logits / temperature)`` cut to the
    ``top_k`` most likely ids, then to the smallest set of ids whose mass reaches ``top_p``,
    renormalised. ``logits`` ``[R, V]``; returns float32 ``[R, V]``. ``temperature > 0``."""
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = z.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop an id when the more likely ids before it already hold top_p of the mass
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _row_seed(seed: int, index: int) -> int:
    """A distinct, reproducible stream per prompt of a request (prompt ``index`` of the list):
    the same prompt list and seed give the same samples however the rows are batched."""
    return (seed * 0x9E3779B97F4A7C15 + index) % (2**63)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class PromptLogprobs(NamedTuple):
    """The model's next-token distribution at every position of a sequence of n tokens; row
    ``t`` is the one after ``tokens[:t+1]`` (predicting ``tokens[t+1]``). What vLLM's
    ``prompt_logprobs`` and SGLang's ``input_top_logprobs`` report (``rollout/server.py``)."""

    ids: torch.Tensor
    """[n-1, k] int64: the k most likely ids, descending log-prob (ties: lower id)."""
    logprobs: torch.Tensor
    """[n-1, k] float32: their log-probabilities."""
    token_logprobs: torch.Tensor
    """[n-1] float32: log-probability of the actual next token ``tokens[t+1]``."""
    token_ranks: torch.Tensor
    """[n-1] int64: its rank, 1 + the number of ids strictly more likely (vLLM's ``rank``)."""



def _unwrap(model):
    """The ``HybridModel`` inside DDP / ``Float16Module`` wrappers (they hold it as ``module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def check_single_rank(config) -> None:
    """Raise unless the model is unsharded (TP = PP = EP = CP = 1; data parallel is fine)."""
    sizes = {
        "tensor": config.tensor_model_parallel_size,
        "pipeline": config.pipeline_model_parallel_size,
        "expert": config.expert_model_parallel_size,
        "context": config.context_parallel_size,
    }
    sharded = {k: v for k, v in sizes.items() if v and v > 1}
    if sharded:
        layout = ", ".join(f"{k} parallel {v}" for k, v in sharded.items())
        raise ValueError(
            f"EmbeddedEngine runs an unsharded model (model-parallel size 1), got {layout}; "
            "serve a sharded policy with an HTTP engine (vLLM/SGLang, "
            "megatron_a1.rollout.http.HTTPEngine)"
        )


class EmbeddedEngine:
    """Samples from our live ``HybridModel`` in this process, with KV and recurrent caches.

    Args:
        model: the megatron-core ``HybridModel`` (or a DDP/``Float16Module`` wrapper around it),
            built for one model-parallel rank. The engine keeps a reference: it always samples
            with the model's current weights.
        vocab_size: the tokenizer's vocabulary; sampling never picks the padded rows above it
            (default: every row of the output layer).
        seed: seeds the engine's generator, used for requests without ``SamplingParams.seed``.
        max_context: most tokens (prompt + generated) per sequence (default: the model's
            ``max_sequence_length``); a generation that reaches it ends with ``"length"``.
        max_batch_size: prompts decoded together (the rest wait for the next batch).
    """

    def __init__(self, model, *, vocab_size: int | None = None, seed: int = 0,
                 max_context: int | None = None, max_batch_size: int = 64):
        self.model = _unwrap(model)
        check_single_rank(self.model.config)
        m = self.model
        if not (m.pre_process and m.post_process):
            raise ValueError("EmbeddedEngine needs the whole model on this rank (no pipeline)")
        if m.position_embedding_type not in ("rope", "none", "learned_absolute"):
            raise NotImplementedError(f"position embedding {m.position_embedding_type!r}")
        if getattr(m, "mtp_process", False):
            raise NotImplementedError("multi-token prediction layers are not supported")
        self.padded_vocab = m.vocab_size
        if vocab_size is not None and not 0 < vocab_size <= m.vocab_size:
            raise ValueError(f"vocab_size must be in [1, {m.vocab_size}], got {vocab_size}")
        self.vocab_size = vocab_size or m.vocab_size
        self.max_context = max_context or m.max_sequence_length
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._kinds = [self._layer_kind(layer) for layer in m.decoder.layers]

    # -- weights -------------------------------------------------------------------------------
    def update_weights(self, version: int | None = None) -> int:
        """Record that the (shared) weights changed: ``weight_version`` becomes ``version``, or
        the next integer. The engine holds the live model, so nothing is copied."""
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        return self.weight_version

    # -- low level: one forward over a ragged batch ---------------------------------------------
    @staticmethod
    def _layer_kind(layer) -> str:
        mixer = getattr(layer, "self_attention", None)
        if isinstance(mixer, SelfAttention):
            return "attention"
        if isinstance(mixer, _UpstreamGDN):
            return "gdn"
        if mixer is None or isinstance(mixer, IdentityOp):
            return "tokenwise"  # MoE / MLP layers: no sequence mixing, called as-is
        raise NotImplementedError(f"EmbeddedEngine: no decode path for {type(mixer).__name__}")

    @property
    def device(self) -> torch.device:
        return self.model.output_layer.weight.device

    def new_cache(self, num_rows: int, capacity: int | None = None) -> DecodeCache:
        """Empty caches for ``num_rows`` sequences of at most ``capacity`` tokens."""
        capacity = capacity or self.max_context
        if capacity > self.max_context:
            raise ValueError(f"capacity {capacity} exceeds max_context {self.max_context}")
        return DecodeCache(num_rows=num_rows, capacity=capacity)

    @contextlib.contextmanager
    def _inference(self):
        """``no_grad`` and eval mode (no dropout, no router aux loss), the mode restored after.

        Switching modes walks every module, so it is done only when the model is training
        (once per ``generate``, not per decode step)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.model.train()

    def forward(self, cache: DecodeCache, tokens: list[list[int]], rows: list[int] | None = None,
                *, all_logits: bool = False) -> torch.Tensor:
        """Feed ``tokens[i]`` to cache row ``rows[i]`` (default: rows 0..) and advance it.

        Returns float32 logits over the padded vocabulary: the last new token of each row,
        ``[len(rows), V]``, or with ``all_logits`` every new token, ``[sum(len), V]`` packed in
        row order.
        """
        rows = list(range(len(tokens))) if rows is None else list(rows)
        if len(rows) != len(tokens) or len(set(rows)) != len(rows):
            raise ValueError("one distinct row per token list")
        with self._inference():
            m, dev = self.model, self.device
            step = _make_step(cache, rows, [len(t) for t in tokens], dev)
            ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long, device=dev)
            h = m.embedding(input_ids=ids[None], position_ids=step.pos[None])  # [T, 1, hidden]
            if m.position_embedding_type == "rope" and cache.rope is None:
                cache.rope = m.rotary_pos_emb(cache.capacity)
            for i, (layer, kind) in enumerate(zip(m.decoder.layers, self._kinds)):
                if kind == "tokenwise":
                    h, _ = layer(hidden_states=h, attention_mask=None)
                    continue
                # TransformerLayer.forward with the mixer swapped for its cached version:
                # pre-norm, mixer, residual add (the layer's bda), then the layer's MLP part.
                x = layer.input_layernorm(h)
                x, residual = x if isinstance(x, tuple) else (x, h)  # fused norms return both
                if layer.config.fp32_residual_connection:
                    residual = residual.float()
                if kind == "attention":
                    out = _attention_step(layer.self_attention, x, self._kv(cache, i, layer),
                                          step, cache.rope)
                else:
                    conv, ssm = self._gdn_states(cache, i, layer.self_attention, x)
                    out = _gdn_step(layer.self_attention, x, conv, ssm, step)
                h = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
                    out, residual, layer.hidden_dropout)
                h = layer._forward_mlp(h)
            if m.decoder.post_process and m.decoder.post_layer_norm:
                h = m.decoder.final_norm(h)
            if not all_logits:
                h = h[step.cu[1:].long() - 1]  # last new token of each row
            weight = None
            if m.share_embeddings_and_output_weights:
                weight = m.shared_embedding_or_output_weight()
            logits, _ = m.output_layer(h, weight=weight)
            logits = m._scale_logits(logits) if hasattr(m, "_scale_logits") else logits
            for r, n in zip(rows, step.counts):
                cache.lengths[r] += n
            return logits.reshape(h.shape[0], -1).float()

    @staticmethod
    def _kv(cache: DecodeCache, i: int, layer):
        if i not in cache.kv:
            att = layer.self_attention
            w = att.linear_qkv.weight
            shape = (cache.num_rows, cache.capacity, att.num_query_groups_per_partition,
                     att.hidden_size_per_attention_head)
            cache.kv[i] = (w.new_zeros(shape), w.new_zeros(shape))
        return cache.kv[i]

    @staticmethod
    def _gdn_states(cache: DecodeCache, i: int, gdn, x):
        if i not in cache.conv:
            w = gdn.conv1d.weight
            cache.conv[i] = x.new_zeros(cache.num_rows, gdn.conv_kernel_dim - 1, w.shape[0])
            cache.ssm[i] = torch.zeros(cache.num_rows, gdn.num_v_heads_local_tp,
                                       gdn.key_head_dim, gdn.value_head_dim,
                                       dtype=torch.float32, device=x.device)
        return cache.conv[i], cache.ssm[i]

    # -- scoring -------------------------------------------------------------------------------
    def prompt_logprobs(self, tokens: list[int], k: int) -> PromptLogprobs:
        """Top-``k`` log-probs at every position of ``tokens`` (one full forward from an empty
        cache). Log-softmax over the real vocabulary (``vocab_size``), as a server whose
        tokenizer has ``vocab_size`` ids reports it."""
        n = len(tokens)
        if n == 0:
            raise ValueError("tokens is empty")
        if min(tokens) < 0 or max(tokens) >= self.vocab_size:
            raise ValueError(f"tokens has ids outside [0, {self.vocab_size})")
        if n > self.max_context:
            raise ValueError(f"{n} tokens; max_context is {self.max_context}")
        if not 0 <= k <= self.vocab_size:
            raise ValueError(f"k must be in [0, {self.vocab_size}], got {k}")
        logits = self.forward(self.new_cache(1, n), [list(tokens)], all_logits=True)
        logp = logits[:-1, : self.vocab_size].log_softmax(-1)  # [n-1, V]
        # a stable sort keeps equal log-probs in id order: ties go to the lower id
        values, ids = logp.sort(dim=-1, descending=True, stable=True)
        nxt = torch.tensor(tokens[1:], dtype=torch.long, device=logp.device)[:, None]
        token_lp = logp.gather(-1, nxt)  # [n-1, 1]
        ranks = 1 + (logp > token_lp).sum(-1)
        return PromptLogprobs(ids[:, :k].cpu(), values[:, :k].float().cpu(),
                              token_lp[:, 0].float().cpu(), ranks.cpu())

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        """One generation per prompt, in order; prompts are decoded ``max_batch_size`` at a
        time, all rows of a batch advancing one token per step."""
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.padded_vocab:
                raise ValueError(f"prompt {i} has ids outside [0, {self.padded_vocab})")
            if len(p) >= self.max_context:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_context is "
                                 f"{self.max_context}")
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {sampling}")
        seeds = [
            _row_seed(sampling.seed, i) if sampling.seed is not None
            else int(torch.randint(0, 2**62, (1,), generator=self._generator))
            for i in range(len(prompts))
        ]
        out: list[Generation] = []
        version = self.weight_version  # the weights this call samples with
        with self._inference():
            for s in range(0, len(prompts), self.max_batch_size):
                batch = slice(s, s + self.max_batch_size)
                out += self._generate_batch(prompts[batch], seeds[batch], sampling)
        for gen in out:
            gen.weight_version = version
        return out

    def _generate_batch(self, prompts, seeds, sp: SamplingParams) -> list[Generation]:
        budgets = [min(sp.max_tokens, self.max_context - len(p)) for p in prompts]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        stop = set(sp.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        active = [r for r, b in enumerate(budgets) if b > 0]
        if not active:
            return [Generation(token_ids=[], logprobs=[], finish_reason="length")
                    for _ in prompts]
        cache = self.new_cache(len(prompts), max(len(p) + b for p, b in zip(prompts, budgets)))
        feed = [prompts[r] for r in active]  # prefill: the whole prompt of each active row
        while active:
            logits = self.forward(cache, feed, active)
            ids, lps = self._sample(logits, [gens[r] for r in active], sp)
            still = []
            for r, t, lp in zip(active, ids, lps):
                tokens[r].append(t)
                logprobs[r].append(lp)
                if t in stop:
                    reasons[r] = "stop"
                elif len(tokens[r]) < budgets[r]:
                    still.append(r)
            active = still
            feed = [[tokens[r][-1]] for r in active]
        return [Generation(token_ids=t, logprobs=lp, finish_reason=why)
                for t, lp, why in zip(tokens, logprobs, reasons)]

    def _sample(self, logits: torch.Tensor, gens, sp: SamplingParams):
        """Next id per row and its log-probability under the policy itself: log-softmax of the
        raw logits over the whole output layer (temperature 1, no top-k/top-p), the quantity the
        trainer recomputes. Sampling itself only sees the real vocabulary."""
        logp = logits.log_softmax(-1)
        z = logits[:, : self.vocab_size]
        if sp.temperature == 0:
            ids = z.argmax(-1)
        else:
            probs = sampling_probs(z, sp.temperature, sp.top_k, sp.top_p)
            # one uniform per row from the row's own generator, inverted through the CDF
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
            cdf = probs.double().cumsum(-1)
            target = (u.to(cdf.device) * cdf[:, -1])[:, None]
            ids = torch.searchsorted(cdf, target, right=True)[:, 0]
            ids = ids.clamp(max=z.shape[-1] - 1)
        lps = logp.gather(-1, ids[:, None])[:, 0]
        return ids.tolist(), lps.tolist()
