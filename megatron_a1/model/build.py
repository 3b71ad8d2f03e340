"""Build the hybrid model for this rank's pipeline stage from a megatron-core config."""
from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig

from megatron_a1.model.backends import get_backend
from megatron_a1.model.config import A1ModelConfig
from megatron_a1.model.specs import hybrid_stack_spec


def build_hybrid_model(
    config: TransformerConfig,
    *,
    pattern: str,
    vocab_size: int,
    max_seq_len: int,
    pg_collection,
    backend: str = "auto",
    rotary_percent: float = 1.0,
    rotary_base: float = 10000,
    gdn_layer=None,
    vp_stage: int | None = None,
) -> HybridModel:
    """One model chunk: embedding on the first stage, output layer on the last.

    ``pattern`` is megatron-core's hybrid layer pattern (``G`` GDN, ``*`` attention, ``E`` MoE;
    ``|`` marks explicit pipeline stage boundaries, otherwise layers are split evenly).
    ``gdn_layer`` overrides the backend provider's Gated DeltaNet layer spec.
    """
    spec = hybrid_stack_spec(
        get_backend(backend),
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        gdn_layer=gdn_layer,
    )
    return HybridModel(
        config=config,
        hybrid_stack_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        hybrid_layer_pattern=pattern,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def build_model(
    model_config: A1ModelConfig,
    config: TransformerConfig,
    *,
    pg_collection,
    backend: str = "auto",
    max_seq_len: int | None = None,
    vp_stage: int | None = None,
) -> HybridModel:
    """This rank's chunk of the model described by a preset.

    ``config`` comes from ``model_config.to_transformer_config(parallel, ...)``; the layer
    pattern, vocabulary and RoPE settings come from ``model_config``.
    """
    if config.num_layers != 2 * model_config.num_layers:
        raise ValueError(
            f"TransformerConfig.num_layers={config.num_layers} does not match the preset's "
            f"{model_config.num_layers} layers (x2: mixer + MoE); build it with "
            "model_config.to_transformer_config()"
        )
    return build_hybrid_model(
        config,
        pattern=model_config.hybrid_pattern,
        vocab_size=model_config.vocab_size,
        max_seq_len=max_seq_len or model_config.max_position_embeddings,
        pg_collection=pg_collection,
        backend=backend,
        rotary_percent=model_config.partial_rotary_factor,
        rotary_base=model_config.rope_theta,
        vp_stage=vp_stage,
    )
