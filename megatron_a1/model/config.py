"""Model presets: the Agents-A1 / Qwen3.5-35B-A3B architecture as one typed dataclass.

    from megatron_a1.model.config import preset
    cfg = preset("agents_a1_35b_a3b")
    tc = cfg.to_transformer_config(parallel)          # megatron-core TransformerConfig
    cfg.hybrid_pattern                                 # "GEGEGE*E" * 10
    cfg.num_parameters(), cfg.num_active_parameters()  # computed from the shapes

``python -m megatron_a1.model.config agents_a1_35b_a3b`` prints a preset and its counts.

The reference is transformers' ``Qwen3_5MoeTextConfig`` / ``Qwen3_5MoeForCausalLM``. What each
reference detail becomes in megatron-core (checked by ``tests/test_model_parity.py``):

* layer ``i`` of the reference (mixer + MoE) is two ``HybridModel`` layers: ``G`` (Gated
  DeltaNet, ``layer_types[i] == "linear_attention"``) or ``*`` (gated full attention), then ``E``.
* norms: every ``Qwen3_5MoeRMSNorm`` (input/post-attention, final, q/k norms) computes
  ``x / rms(x) * (1 + w)`` in float32: ``layernorm_zero_centered_gamma=True``. The Gated
  DeltaNet's gated output norm (``Qwen3_5MoeRMSNormGated``) is ``w * x / rms(x)``, *not*
  zero-centred: its spec forces a plain norm (see :mod:`megatron_a1.model.specs`).
* attention: ``q_proj`` rows are per head ``[query (head_dim) | gate (head_dim)]``; megatron's
  ``linear_qkv`` with ``attention_output_gate`` is per KV group ``[queries | gates | key |
  value]`` (the converter permutes rows); output ``o * sigmoid(gate)`` before ``o_proj`` in
  both. q/k RMSNorm over the head dim before RoPE in both.
* RoPE: the reference's interleaved M-RoPE (``mrope_section``, ``mrope_interleaved``) takes the
  same position for its three axes on text, so each frequency slot gets the text position and
  the result is plain RoPE, ``rotate_half`` style, on the first ``partial_rotary_factor *
  head_dim`` dims of each head: megatron's ``rotary_percent`` with ``rotary_interleaved=False``.
* router: softmax over all experts, top-k, renormalised to sum 1 (Qwen3.5 always renormalises;
  there is no ``norm_topk_prob`` switch). megatron-core's default (top-k on the logits, softmax
  over the k) is the same function. Router logits in float32 (``moe_router_dtype="fp32"``).
* shared expert: SwiGLU MLP scaled by ``sigmoid(x @ shared_expert_gate)``:
  ``moe_shared_expert_gate=True``.
* aux loss: both use the switch-style load-balancing loss with coefficient ``router_aux_loss_coef``;
  megatron computes it per layer and per micro-batch, the reference over all layers at once, so
  loss *values* differ (logits do not).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(kw_only=True, frozen=True)
class A1ModelConfig:
    """Architecture of a Qwen3.5-MoE style hybrid model (names follow ``Qwen3_5MoeTextConfig``)."""

    name: str = "custom"
    """Preset name (informational)."""
    vocab_size: int = 248_320
    """Vocabulary size, already padded (248,320 = 248,044 BPE ranks + specials + padding)."""
    hidden_size: int = 2048
    """Residual stream width."""
    layer_types: tuple[str, ...] = field(
        default_factory=lambda: tuple(LINEAR if (i + 1) % 4 else FULL for i in range(40))
    )
    """Mixer of each reference layer: ``"linear_attention"`` (Gated DeltaNet) or
    ``"full_attention"``; each is followed by an MoE block. 35B-A3B: 40 layers, every 4th full."""
    num_attention_heads: int = 16
    """Query heads of the full-attention layers."""
    num_key_value_heads: int = 2
    """KV heads (GQA groups) of the full-attention layers."""
    head_dim: int = 256
    """Head dimension of the full-attention layers."""
    partial_rotary_factor: float = 0.25
    """Fraction of ``head_dim`` rotated by RoPE (the first dims of each head)."""
    rope_theta: float = 10_000_000.0
    """RoPE base. The released Qwen3.5-35B-A3B config.json says 1e7 (``Qwen3_5MoeTextConfig``'s
    class default is 1e4; a checkpoint's own config always wins, see :meth:`from_hf_config`)."""
    max_position_embeddings: int = 262_144
    """Native context (the released config; the class default is 32,768)."""
    linear_conv_kernel_dim: int = 4
    """Causal depthwise conv kernel of the Gated DeltaNet."""
    linear_key_head_dim: int = 128
    """Gated DeltaNet query/key head dimension."""
    linear_value_head_dim: int = 128
    """Gated DeltaNet value head dimension."""
    linear_num_key_heads: int = 16
    """Gated DeltaNet query/key heads."""
    linear_num_value_heads: int = 32
    """Gated DeltaNet value heads (a multiple of the key heads)."""
    num_experts: int = 256
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 8
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 512
    """FFN width of each routed expert (SwiGLU)."""
    shared_expert_intermediate_size: int = 512
    """FFN width of the shared expert (SwiGLU, sigmoid-gated)."""
    router_aux_loss_coef: float = 0.001
    """Load-balancing aux loss coefficient."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    initializer_range: float = 0.02
    """Std of the normal init of linear weights (fresh models only)."""

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        if bad:
            raise ValueError(f"unknown layer types {bad}: expected {LINEAR!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if not 2 <= self.num_experts_per_tok <= self.num_experts:
            # megatron-core forces moe_router_pre_softmax for top-1, whose weight is then the
            # un-renormalised probability; the reference renormalises (weight 1.0).
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}: must be in "
                             f"[2, num_experts={self.num_experts}]")
        rot = self.head_dim * self.partial_rotary_factor
        if rot != int(rot) or int(rot) % 2:
            raise ValueError(f"head_dim * partial_rotary_factor = {rot} must be an even integer")

    # ---- derived --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Reference (decoder) layers; ``HybridModel`` has twice as many (mixer, MoE)."""
        return len(self.layer_types)

    @property
    def hybrid_pattern(self) -> str:
        """megatron-core ``hybrid_layer_pattern``: ``G``/``*`` then ``E`` for every layer."""
        return "".join(("G" if t == LINEAR else "*") + "E" for t in self.layer_types)

    def replace(self, **changes) -> "A1ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (from the shapes; tests check them against built models) --------
    def _counts(self) -> dict[str, int]:
        h, v = self.hidden_size, self.vocab_size
        nk, nv = self.linear_num_key_heads, self.linear_num_value_heads
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        gdn = (
            h  # input norm
            + h * (2 * nk * dk + 2 * nv * dv + 2 * nv)  # in_proj: q k v z b a
            + (2 * nk * dk + nv * dv) * self.linear_conv_kernel_dim  # depthwise conv
            + 2 * nv  # A_log, dt_bias
            + dv  # gated output norm
            + nv * dv * h  # out_proj
        )
        nh, ng, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = h + h * (2 * nh * hd + 2 * ng * hd) + 2 * hd + nh * hd * h
        expert = 3 * h * self.moe_intermediate_size
        moe_dense = h + self.num_experts * h + 3 * h * self.shared_expert_intermediate_size + h
        n_lin = sum(t == LINEAR for t in self.layer_types)
        n_full = self.num_layers - n_lin
        return {
            "embedding": v * h,
            "output_layer": v * h,
            "final_norm": h,
            "gated_deltanet": n_lin * gdn,
            "attention": n_full * attn,
            "moe_dense": self.num_layers * moe_dense,  # norm, router, shared expert + gate
            "experts_total": self.num_layers * self.num_experts * expert,
            "experts_active": self.num_layers * self.num_experts_per_tok * expert,
        }

    def num_parameters(self) -> int:
        """All parameters (embedding and output layer included)."""
        c = self._counts()
        return sum(n for k, n in c.items() if k != "experts_active")

    def num_active_parameters(self) -> int:
        """Parameters one token uses: routed experts counted ``num_experts_per_tok`` times."""
        c = self._counts()
        return sum(n for k, n in c.items() if k != "experts_total")

    # ---- megatron-core ---------------------------------------------------------------------
    def to_transformer_config(self, parallel=None, **overrides):
        """megatron-core ``TransformerConfig`` for this architecture under ``parallel``.

        Args:
            parallel: a :class:`megatron_a1.runtime.ParallelConfig` (None: one rank).
            overrides: any ``TransformerConfig`` field (dtype, dispatcher, recompute, ...).
        """
        from megatron.core.transformer import TransformerConfig

        p = parallel
        kw: dict[str, Any] = dict(
            num_layers=2 * self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.moe_intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            layernorm_zero_centered_gamma=True,
            qk_layernorm=True,
            attention_output_gate=True,
            rotary_interleaved=False,
            add_bias_linear=False,
            add_qkv_bias=False,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.initializer_range,
            linear_conv_kernel_dim=self.linear_conv_kernel_dim,
            linear_key_head_dim=self.linear_key_head_dim,
            linear_value_head_dim=self.linear_value_head_dim,
            linear_num_key_heads=self.linear_num_key_heads,
            linear_num_value_heads=self.linear_num_value_heads,
            num_moe_experts=self.num_experts,
            moe_router_topk=self.num_experts_per_tok,
            moe_ffn_hidden_size=self.moe_intermediate_size,
            moe_shared_expert_intermediate_size=self.shared_expert_intermediate_size,
            moe_shared_expert_gate=True,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=self.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            params_dtype=torch.float32,
            use_cpu_initialization=not torch.cuda.is_available(),
            calculate_per_token_loss=True,
        )
        if p is not None:
            kw.update(
                tensor_model_parallel_size=p.tensor_parallel,
                pipeline_model_parallel_size=p.pipeline_parallel,
                virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
                context_parallel_size=p.context_parallel,
                expert_model_parallel_size=p.expert_parallel,
                expert_tensor_parallel_size=p.expert_tensor_parallel or p.tensor_parallel,
                sequence_parallel=p.sequence_parallel,
            )
        kw.update(overrides)
        if kw.get("pipeline_model_parallel_size", 1) > 1:
            kw.setdefault("pipeline_dtype", kw["params_dtype"])
        return TransformerConfig(**kw)

    @property
    def rotary_percent(self) -> float:
        return self.partial_rotary_factor

    # ---- transformers ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf, name: str = "hf") -> "A1ModelConfig":
        """From a transformers config (object or ``config.json`` dict) of ``qwen3_5_moe``.

        Accepts ``Qwen3_5MoeTextConfig`` and the multimodal ``Qwen3_5MoeConfig`` (its
        ``text_config`` is used). Raises ``ValueError`` for anything this model does not
        reproduce exactly (attention bias, tied embeddings, another activation or RoPE type).
        """
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        if "text_config" in d and d["text_config"] is not None:
            tied = d.get("tie_word_embeddings", False)
            d = dict(d["text_config"])
            d.setdefault("tie_word_embeddings", tied)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "rope_theta" in d and "rope_theta" not in rope:
            rope["rope_theta"] = d["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        problems = []
        if rope_type != "default":
            problems.append(f"rope_type={rope_type!r} (only 'default')")
        if d.get("attention_bias"):
            problems.append("attention_bias=True")
        if d.get("tie_word_embeddings"):
            problems.append("tie_word_embeddings=True")
        if d.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={d['hidden_act']!r}")
        if problems:
            raise ValueError("unsupported Qwen3.5-MoE config: " + ", ".join(problems))
        n = d.get("num_hidden_layers", 40)
        layer_types = d.get("layer_types") or [
            LINEAR if (i + 1) % d.get("full_attention_interval", 4) else FULL for i in range(n)
        ]
        return cls(
            name=name,
            vocab_size=d.get("vocab_size", 248_320),
            hidden_size=d.get("hidden_size", 2048),
            layer_types=tuple(layer_types[:n]),
            num_attention_heads=d.get("num_attention_heads", 16),
            num_key_value_heads=d.get("num_key_value_heads", 2),
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            partial_rotary_factor=rope.get(
                "partial_rotary_factor", d.get("partial_rotary_factor", 0.25)
            ),
            rope_theta=float(rope.get("rope_theta", 10_000.0)),
            max_position_embeddings=d.get("max_position_embeddings", 32_768),
            linear_conv_kernel_dim=d.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=d.get("linear_key_head_dim", 128),
            linear_value_head_dim=d.get("linear_value_head_dim", 128),
            linear_num_key_heads=d.get("linear_num_key_heads", 16),
            linear_num_value_heads=d.get("linear_num_value_heads", 32),
            num_experts=d.get("num_experts", 256),
            num_experts_per_tok=d.get("num_experts_per_tok", 8),
            moe_intermediate_size=d.get("moe_intermediate_size", 512),
            shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 512),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            initializer_range=d.get("initializer_range", 0.02),
        )

    def to_hf_config_dict(self) -> dict:
        """``config.json`` contents of the equivalent ``Qwen3_5MoeForCausalLM``."""
        return {
            "architectures": ["Qwen3_5MoeForCausalLM"],
            "model_type": "qwen3_5_moe_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
        }


def _interval(n: int, every: int) -> tuple[str, ...]:
    return tuple(LINEAR if (i + 1) % every else FULL for i in range(n))


PRESETS: dict[str, A1ModelConfig] = {
    # Qwen3.5-35B-A3B (the model Agents-A1 is trained from): DESIGN.md section 3.
    "agents_a1_35b_a3b": A1ModelConfig(name="agents_a1_35b_a3b"),
    # CPU demo: ~3M parameters, pattern GE*EGE*E, 8 experts top-2.
    "tiny": A1ModelConfig(
        name="tiny", vocab_size=4096, hidden_size=128, layer_types=_interval(4, 2),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.25,
        rope_theta=10_000.0, max_position_embeddings=4096, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    # Unit tests: smallest shapes that exercise every layout (GQA, TP=2 split of every head).
    "tiny_test": A1ModelConfig(
        name="tiny_test", vocab_size=128, hidden_size=32, layer_types=_interval(2, 2),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
        rope_theta=10_000.0, max_position_embeddings=256, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
}


def preset(name: str) -> A1ModelConfig:
    """A named preset (``agents_a1_35b_a3b``, ``tiny``, ``tiny_test``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    cfg = preset(args.name)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["layer_types"] = f"{cfg.num_layers} layers, pattern {cfg.hybrid_pattern}"
    print(json.dumps(fields, indent=2, default=str))
    total, active = cfg.num_parameters(), cfg.num_active_parameters()
    print(f"total parameters:  {total:,} ({total / 1e9:.2f}B)")
    print(f"active parameters: {active:,} ({active / 1e9:.2f}B per token)")


if __name__ == "__main__":
    main()
