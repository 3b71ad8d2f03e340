"""Memory per rank of a training config, component by component, from the architecture.

    from megatron_a1.training.memory import estimate
    est = estimate(cfg, world_size=32)            # cfg: a TrainConfig
    est.stages["last"].total, est.stages["last"].components   # bytes
    est.params_per_rank, est.data_parallel, est.expert_data_parallel

What is counted (bytes per rank, for each kind of pipeline stage: first / middle / last):

* **weights** — this rank's parameters in the model dtype (bf16 or fp32). Dense layers are split
  by TP and by PP stage; routed experts by EP x ETP; the embedding lives on the first stage, the
  output layer and final norm on the last, both vocabulary-split by TP.
* **grads** — megatron-core DDP's contiguous gradient buffers, fp32 (``grad_reduce_in_fp32``
  in :mod:`megatron_a1.training.engine`), one element per parameter.
* **optimizer** — Adam ``m`` and ``v`` (fp32) plus, with bf16, the fp32 master weights; with the
  distributed optimizer the dense part is sharded over DP x CP and the experts over expert-DP.
* **activations** — what autograd keeps for the backward pass, enumerated tensor by tensor for
  each layer kind (Gated DeltaNet: projections, causal conv, gates, chunk intermediates, gated
  norm; attention: QKV, q/k norms, RoPE, the packed kernel's saved ``out`` and ``lse``, output
  gate; MoE: norm, router, the dispatcher's permuted tokens and maps for top-k routing (dropless:
  T x k rows), expert SwiGLU, shared expert and its gate), times the micro-batches the pipeline
  schedule keeps in flight, under the recompute setting.
* **loss_head** — the peak of the stage's loss on the final hidden states: full [T, V/TP] logits
  (megatron-core's output layer + vocab-parallel cross-entropy) or chunks of them (the fused
  linear cross-entropy, GRPO's chunked log-probs, OPD's fused SVA), plus the output-layer weight
  gradient it produces.
* **frozen_models** — co-located OPD teachers (one per distinct checkpoint) and the GRPO
  reference, weights only; a sampler copy of the policy for the embedded rollout engine with
  ``rollout.max_staleness > 0``.
* **transient** — the largest allocation outside those: the backward of a recomputed layer
  (full recompute), the embedded engine's KV cache while it generates.

The peak of a rank is the largest of a few instants (end of the forward with the loss head, a
recomputed layer's backward, generation); each instant's components are reported.

Two implementations of the sequence-mixing cores are modelled: ``device="cuda"`` (fla's chunked
Gated DeltaNet kernel, the Triton packed attention) and ``device="cpu"`` (the PyTorch chunked
gated delta rule of :mod:`megatron_a1.model.gated_delta_rule`, whose intra-chunk [C, C] matrices
dominate, and the same attention kernel, interpreted). ``tests/test_memory_model.py`` checks the
CPU model against measured storage; the GPU rows differ only in the Gated DeltaNet core.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GiB = 1024**3
GDN_CHUNK = 64
"""Tokens per chunk of the Gated DeltaNet (fla's and the PyTorch path's ``chunk_size``)."""


@dataclass
class StageMemory:
    """One pipeline-stage kind of rank: its parameters and its peak, by component (bytes)."""

    params: int
    dense_params: int
    expert_params: int
    layers: int
    components: dict[str, int]
    peak_at: str
    """Which instant is the peak: ``loss_head``, ``recompute_backward``, ``generation``, ..."""

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclass
class MemoryEstimate:
    world_size: int
    data_parallel: int
    expert_data_parallel: int
    micro_batches: int
    tokens_per_micro_batch: int
    stages: dict[str, StageMemory] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def params_per_rank(self) -> int:
        return max(s.params for s in self.stages.values())

    @property
    def peak(self) -> StageMemory:
        return max(self.stages.values(), key=lambda s: s.total)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, s in self.stages.items():
            d["stages"][name]["total"] = s.total
        return d


# ---- parameters --------------------------------------------------------------------------------
def _layer_params(mc, tp: int, ep: int, etp: int) -> dict[str, tuple[int, int]]:
    """(dense, expert) parameters of one reference layer of each kind on one rank."""
    h = mc.hidden_size
    nk, nv = mc.linear_num_key_heads, mc.linear_num_value_heads
    dk, dv = mc.linear_key_head_dim, mc.linear_value_head_dim
    gdn = (h + dv  # input norm, gated output norm (replicated)
           + (h * (2 * nk * dk + 2 * nv * dv + 2 * nv)  # in_proj q k v z b a
              + (2 * nk * dk + nv * dv) * mc.linear_conv_kernel_dim  # depthwise conv
              + 2 * nv + nv * dv * h) // tp)  # A_log, dt_bias, out_proj
    nh, ng, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    attn = h + 2 * hd + (h * (2 * nh * hd + 2 * ng * hd) + nh * hd * h) // tp
    moe_dense = h + mc.num_experts * h + h + 3 * h * mc.shared_expert_intermediate_size // tp
    experts = (mc.num_experts // ep) * 3 * h * mc.moe_intermediate_size // etp
    return {"G": (gdn, 0), "*": (attn, 0), "E": (moe_dense, experts)}


def _stage_layers(mc, pp: int) -> list[list[str]]:
    """Reference layers' mixer kinds per pipeline stage (megatron splits the pattern evenly)."""
    kinds = ["G" if t == "linear_attention" else "*" for t in mc.layer_types]
    per = math.ceil(len(kinds) / pp)
    return [kinds[i * per:(i + 1) * per] for i in range(pp)]


# ---- activations per layer kind -----------------------------------------------------------------
@dataclass
class _Shape:
    tokens: int
    """Tokens of one micro-batch on this rank's sequence (after CP)."""
    seq: int
    """Tokens of the residual stream on this rank (after sequence parallelism)."""
    tp: int
    etp: int
    """Expert tensor parallelism (the MoE dispatcher gathers the ETP group's tokens)."""
    act: int
    """Bytes per activation element (2 bf16, 4 fp32)."""
    slots: int
    """Gated DeltaNet chunk slots: documents cut into GDN_CHUNK chunks, the last padded."""
    device: str


def _norm(s: _Shape, h: int) -> float:
    """A pre-norm (RMSNorm, fp32 inverse rms) and the residual add after its layer."""
    return s.seq * (3 * h * s.act + 4)


def _gdn_activations(mc, s: _Shape) -> float:
    h, tp, a = mc.hidden_size, s.tp, s.act
    nk, nv = mc.linear_num_key_heads // tp, mc.linear_num_value_heads // tp
    dk, dv, w = mc.linear_key_head_dim, mc.linear_value_head_dim, mc.linear_conv_kernel_dim
    conv = 2 * nk * dk + nv * dv
    t = s.tokens
    total = _norm(s, h)
    total += t * (2 * nk * dk + 2 * nv * dv + 2 * nv) * a  # in_proj output
    total += t * nv * (4 * dv * a + 4)  # gated output norm: silu(z), x*rsqrt, *w, *gate; rsqrt
    total += t * 3 * nv * 4  # g (softplus), beta (sigmoid), decay in fp32
    if s.device == "cpu":
        total += t * w * conv * 4 + t * (w - 1) * 4  # conv taps, document masks (fp32)
        total += t * (2 * nv * dk + nv * dv) * 4  # q/k repeated to value heads, output
        total += t * (2 * nk * 4 + 8)  # q/k l2norm inverse norms, slot index (int64)
        # chunked delta rule, per slot and value head: decay, system, attention and their
        # products ([C, C]), chunked q/k/v and their decayed copies, the triangular solve, the
        # per-step state corrections, the cumulative gates
        total += s.slots * nv * (5 * GDN_CHUNK + 6 * dk + 3 * dv + 4) * 4 + s.slots * 8
    else:
        # fla: causal conv saves its input; l2norm its output and rstd; the chunked rule saves
        # q, k, v, the cumulative gate and beta (fp32), and A ([T, H, C] fp32); output
        total += t * conv * a + t * conv * a + t * 2 * nk * 4
        total += t * (2 * nk * dk + nv * dv + nv * dv) * a + t * nv * (2 + GDN_CHUNK) * 4
    return total


def _attention_activations(mc, s: _Shape, recompute: str) -> float:
    h, tp, a = mc.hidden_size, s.tp, s.act
    nh, ng, hd = mc.num_attention_heads // tp, max(1, mc.num_key_value_heads // tp), mc.head_dim
    rot = int(hd * mc.partial_rotary_factor)
    t = s.tokens
    total = _norm(s, h)
    total += t * (2 * nh * hd + 2 * ng * hd) * a  # linear_qkv output (queries, gates, k, v)
    total += t * 2 * ng * hd * a  # key/value split
    total += t * ((nh + ng) * hd * a + (nh + ng) * 4)  # q/k RMSNorm outputs, inverse rms
    total += t * 4 * rot * 4  # RoPE cos/sin (fp32)
    total += t * (nh + ng) * hd * a  # rotated q, k (the kernel's saved inputs)
    total += t * nh * 4  # the kernel's log-sum-exp (fp32)
    if recompute != "selective":
        total += t * nh * hd * a  # the kernel's output (selective: recomputed)
    total += t * 2 * nh * hd * a  # sigmoid gate, gated output (linear_proj input)
    return total


def _moe_activations(mc, s: _Shape) -> float:
    h, a, k, e = mc.hidden_size, s.act, mc.num_experts_per_tok, mc.num_experts
    f, fs = mc.moe_intermediate_size // s.etp, mc.shared_expert_intermediate_size // s.tp
    t = s.seq  # tokens entering the router on this rank
    total = _norm(s, h)
    total += t * (2 * e * 4 + e + k * 8 + k * 4)  # router probs, routing map, top-k ids, weights
    # dropless top-k: every token reaches k experts (balanced over EP ranks); with expert
    # tensor parallelism the dispatcher gathers the tokens of the ETP group onto each rank
    rows = t * k * s.etp
    total += rows * (h * a + 4 + 3 * 8)  # permuted tokens, their probs, sort/permutation ids
    total += rows * 6 * f * a  # expert SwiGLU: fc1 output, silu, products, weighted output
    total += t * (5 * fs + h) * a + t * 4  # shared expert SwiGLU, its output, sigmoid gate
    return total


def _layer_activations(mc, s: _Shape, recompute: str) -> dict[str, float]:
    return {"G": _gdn_activations(mc, s), "*": _attention_activations(mc, s, recompute),
            "E": _moe_activations(mc, s)}


# ---- the loss head ------------------------------------------------------------------------------
def _loss_head(cfg, mc, s: _Shape, tp: int) -> float:
    """Peak of the loss on the final hidden states, while the activations are all alive."""
    t, h = s.tokens, mc.hidden_size
    v_local = mc.vocab_size // tp
    weight_grad = v_local * h * 4  # the output layer's weight gradient before it reaches DDP
    hidden = t * h * 4  # the final hidden states' gradient (and SP gather)
    if s.seq != t:  # sequence parallelism: the gathered hidden states and their gradient
        hidden += 2 * t * h * s.act
    stage = cfg.train.stage
    if stage == "sft":
        sft = getattr(cfg, "sft", None)
        if getattr(sft, "fused_loss", False):
            c = min(t, getattr(sft, "chunk_size", 4096))
            return 2 * c * v_local * 4 + weight_grad + hidden  # fp32 logits chunk + its grad
        # megatron-core: logits in the model dtype, fp32 for the cross-entropy (in place)
        logits = t * v_local * (4 + (s.act if s.act != 4 else 0))
        return logits + weight_grad + hidden
    if stage == "grpo":
        c = min(t, cfg.grpo.chunk_size)
        entropy = bool(cfg.grpo.entropy_coef)
        # one checkpointed chunk recomputed in the backward: logits, exp (and e*z for the
        # entropy) and their gradients
        return (4 + 2 * entropy) * c * v_local * 4 + weight_grad + hidden
    # opd: the teacher's hidden states and one [C, V] teacher-logits chunk with the top-k pass
    c = min(t, cfg.opd.chunk_size)
    return 2 * c * v_local * 4 + weight_grad + 2 * hidden + t * cfg.opd.topk * 12


# ---- the estimate -------------------------------------------------------------------------------
def estimate(cfg, world_size: int, *, device: str = "cuda",
             doc_lengths: list[int] | None = None) -> MemoryEstimate:
    """Per-rank memory of ``cfg`` (a :class:`~megatron_a1.training.config.TrainConfig`) on
    ``world_size`` ranks.

    Args:
        device: which kernels run (``"cuda"``: fla / Triton; ``"cpu"``: the PyTorch paths).
        doc_lengths: document lengths of one packed micro-batch (default: one document filling
            ``data.max_seq_len``); they set the Gated DeltaNet's padded chunk count.
    """
    from megatron_a1.training.model_setup import resolve_model_config

    mc = resolve_model_config(cfg.model)
    p = cfg.parallel
    tp, pp, cp, ep = p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.expert_parallel
    etp = p.expert_tensor_parallel or tp
    vpp = p.virtual_pipeline_parallel or 1
    dp = max(1, world_size // (tp * pp * cp))
    edp = max(1, world_size // (ep * etp * pp))
    bf16 = cfg.model.bf16
    w_bytes = 2 if bf16 else 4
    act = 2 if bf16 else 4
    t_pack = sum(doc_lengths) if doc_lengths else cfg.data.max_seq_len
    lengths = doc_lengths or [t_pack]
    tokens_mb = t_pack * cfg.train.micro_batch_size
    slots = sum(math.ceil(n / GDN_CHUNK) * GDN_CHUNK for n in lengths) * cfg.train.micro_batch_size
    t_rank = tokens_mb // cp
    shape = _Shape(tokens=t_rank, seq=t_rank // tp if p.sequence_parallel else t_rank, tp=tp,
                   etp=etp, act=act, slots=slots // cp, device=device)
    stage_kind = cfg.train.stage
    online = bool(cfg.rollout.tasks)
    if stage_kind == "grpo" or online:
        micro = None
    else:
        micro = max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp))
    est = MemoryEstimate(world_size, dp, edp, micro or 0, tokens_mb)

    layer_params = _layer_params(mc, tp, ep, etp)
    layer_act = _layer_activations(mc, shape, cfg.model.recompute)
    h, v_local = mc.hidden_size, mc.vocab_size // tp
    stages = _stage_layers(mc, pp)
    kinds = {"first": 0, "middle": pp // 2, "last": pp - 1} if pp > 2 else (
        {"first": 0, "last": 1} if pp == 2 else {"all": 0})
    for name, s_idx in kinds.items():
        mixers = stages[s_idx]
        dense = sum(layer_params[m][0] + layer_params["E"][0] for m in mixers)
        experts = len(mixers) * layer_params["E"][1]
        first, last = s_idx == 0, s_idx == pp - 1
        if first:
            dense += v_local * h
        if last:
            dense += v_local * h + h
        params = dense + experts
        c: dict[str, int] = {"weights": params * w_bytes, "grads": params * 4}
        if cfg.optim.distributed:
            per_param = 8 + (4 if bf16 else 0)
            c["optimizer"] = math.ceil(dense * per_param / (dp * cp)) + math.ceil(
                experts * per_param / edp)
        else:
            c["optimizer"] = params * (8 + (4 if bf16 else 0))

        # activations of one micro-batch on this stage
        inputs = shape.seq * h * act  # a layer's input (what full recompute keeps)
        order = [k for m in mixers for k in (m, "E")]  # the stage's layers, in order
        outside = 0
        if first:
            outside += shape.seq * h * act  # embedding output
        if last:
            outside += shape.seq * (2 * h * act + 4)  # final norm
        outside += t_rank * int(mc.head_dim * mc.partial_rotary_factor) * 4  # RoPE table (fp32)
        if cfg.model.recompute == "full":
            saved = len(order) * inputs + outside
        else:
            saved = sum(layer_act[k] for k in order) + outside
        in_flight = 1
        if pp > 1:
            in_flight = pp - s_idx
            if vpp > 1:
                in_flight = math.ceil(in_flight * (1 + (pp - 1) / (pp * vpp)))
            in_flight = min(in_flight, micro or in_flight)
        c["activations"] = int(saved * in_flight)
        if last:
            c["loss_head"] = int(_loss_head(cfg, mc, shape, tp))
        frozen = _frozen_models(cfg, params * w_bytes)
        if frozen:
            c["frozen_models"] = frozen
        peak_at = "loss_head" if last else "forward"
        candidates = [(c, peak_at)]
        if cfg.model.recompute == "full" and order:
            # the backward of layer j recomputes its whole saved set and adds the gradients of
            # its largest saved tensor and of that tensor's input; the inputs of the layers
            # after j are freed by then
            j = max(range(len(order)), key=lambda j: j * inputs + layer_act[order[j]]
                    + 2 * _largest_item(mc, shape, order[j]))
            rb = dict(c)
            rb.pop("loss_head", None)
            # (the other micro-batches in flight keep their checkpoints; the final norm's
            # backward is done, the embedding output is layer 0's checkpointed input)
            rope = t_rank * int(mc.head_dim * mc.partial_rotary_factor) * 4
            rb["activations"] = int(saved * (in_flight - 1) + (j + 1) * inputs + rope)
            rb["transient"] = int(layer_act[order[j]] + 2 * _largest_item(mc, shape, order[j]))
            candidates.append((rb, "recompute_backward"))
        gen = _generation(cfg, mc, act, dp)
        if gen:
            g = {k: v for k, v in c.items() if k not in ("activations", "loss_head")}
            g["transient"] = gen
            candidates.append((g, "generation"))
        comps, at = max(candidates, key=lambda x: sum(x[0].values()))
        est.stages[name] = StageMemory(params, dense, experts, len(mixers), comps, at)
    if device == "cuda" and p.context_parallel > 1:
        est.notes.append("context parallelism: attention and Gated DeltaNet activations are "
                         "divided by CP (fla / Transformer Engine CP paths)")
    est.notes.append("MoE: dropless top-k routing, assumed balanced over EP ranks (an "
                     "imbalanced step holds up to EP x the routed rows on one rank)")
    return est


def _largest_item(mc, s: _Shape, kind: str) -> float:
    """The largest single saved tensor of a layer kind (what a backward step doubles)."""
    a, tp = s.act, s.tp
    if kind == "G":
        items = [s.tokens * (2 * mc.linear_num_key_heads * mc.linear_key_head_dim
                             + 2 * mc.linear_num_value_heads * mc.linear_value_head_dim) * a / tp]
        if s.device == "cpu":
            items.append(s.slots * (mc.linear_num_value_heads // tp) * GDN_CHUNK * 4)
        return max(items)
    if kind == "*":
        return s.tokens * (2 * mc.num_attention_heads + 2 * mc.num_key_value_heads) \
            * mc.head_dim * a / tp
    return s.seq * s.etp * mc.num_experts_per_tok * max(mc.hidden_size,
                                                      2 * mc.moe_intermediate_size) * a


def _frozen_models(cfg, policy_weight_bytes: int) -> int:
    """Co-located frozen models: OPD teachers (one per distinct checkpoint), GRPO reference,
    the embedded engine's sampler copy of the policy when it runs ahead of training."""
    n = 0
    if cfg.train.stage == "opd":
        n += len(set(cfg.opd.teachers.values()))
    if cfg.train.stage == "grpo" and cfg.grpo.kl_coef:
        n += 1
    if cfg.rollout.tasks and cfg.rollout.engine == "embedded" and cfg.rollout.max_staleness > 0:
        n += 1
    return n * policy_weight_bytes


def _generation(cfg, mc, act: int, dp: int) -> int:
    """The embedded engine's caches while it samples this rank's rows of a step (0 for served
    engines); data-parallel replicas sample disjoint slices of the prompts."""
    r = cfg.rollout
    if not r.tasks or r.engine != "embedded":
        return 0
    grpo = cfg.train.stage == "grpo"
    prompts = cfg.grpo.prompts_per_step if grpo else cfg.train.global_batch_size
    rows = math.ceil(prompts / dp) * r.samples_per_prompt
    n_full = sum(t == "full_attention" for t in mc.layer_types)
    n_lin = mc.num_layers - n_full
    kv = n_full * 2 * mc.num_key_value_heads * mc.head_dim * r.context_limit * act
    state = n_lin * (mc.linear_num_value_heads * mc.linear_key_head_dim
                     * mc.linear_value_head_dim * 4
                     + (mc.linear_conv_kernel_dim - 1) * (2 * mc.linear_num_key_heads
                                                          * mc.linear_key_head_dim
                                                          + mc.linear_num_value_heads
                                                          * mc.linear_value_head_dim) * act)
    logits = r.context_limit * mc.vocab_size * 4  # a prefill's last-position logits, bounded
    return rows * (kv + state) + logits
