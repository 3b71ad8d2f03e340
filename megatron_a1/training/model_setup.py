"""Build this rank's model chunks from the training config (preset + overrides + layout)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_a1.configs import ConfigError
from megatron_a1.model.build import build_model
from megatron_a1.model.config import A1ModelConfig, preset


@dataclass
class ModelInfo:
    model_config: A1ModelConfig
    transformer_config: object
    pattern: str
    num_experts: int
    top_k: int
    vocab_size: int


def resolve_model_config(section) -> A1ModelConfig:
    try:
        base = preset(section.preset)
    except KeyError as exc:
        raise ConfigError(f"model.preset: {exc.args[0]}") from None
    try:
        return base.replace(**section.overrides)
    except TypeError as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def build_model_chunks(cfg, rt) -> tuple[list, ModelInfo]:
    """One chunk per virtual pipeline stage (one without virtual pipelining)."""
    mc = resolve_model_config(cfg.model)
    recompute = {} if cfg.model.recompute == "none" else dict(
        recompute_granularity=cfg.model.recompute,
        **({"recompute_method": "uniform", "recompute_num_layers": 1}
           if cfg.model.recompute == "full" else {}))
    tc = mc.to_transformer_config(
        rt.parallel,
        bf16=cfg.model.bf16,
        params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
        # packs differ in length (padded only to a multiple of TP): pipeline stages exchange
        # each micro-batch's shape instead of assuming data.max_seq_len tokens
        variable_seq_lengths=rt.parallel.pipeline_parallel > 1,
        **recompute,
    )
    vpp = rt.parallel.virtual_pipeline_parallel
    chunks = [
        build_model(mc, tc, pg_collection=rt.pg_collection, backend=cfg.model.backend,
                    max_seq_len=cfg.data.max_seq_len, vp_stage=vp if vpp else None)
        for vp in range(vpp or 1)
    ]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    info = ModelInfo(mc, tc, mc.hybrid_pattern, mc.num_experts, mc.num_experts_per_tok,
                     mc.vocab_size)
    return chunks, info
