"""Presets and specs: the 35B-A3B numbers, computed parameter counts, the transformers config
round trip, RoPE equivalence on text, and which norms are zero-centred."""
import sys

import pytest
import torch

if sys.modules.get("fla") is not None:
    pytest.skip("fla was imported before transformers could be guarded", allow_module_level=True)
sys.modules["fla"] = None
sys.modules.setdefault("causal_conv1d", None)

from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf  # noqa: E402
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig  # noqa: E402

from megatron_a1.model.config import A1ModelConfig, main, preset  # noqa: E402


def test_35b_a3b_preset_matches_transformers_defaults_and_counts(capsys):
    cfg = preset("agents_a1_35b_a3b")
    from_hf = A1ModelConfig.from_hf_config(Qwen3_5MoeTextConfig(), name=cfg.name)
    # the released config.json differs from the class defaults in exactly these two fields
    assert from_hf.replace(rope_theta=1e7, max_position_embeddings=262_144) == cfg
    assert cfg.hybrid_pattern == "GEGEGE*E" * 10
    assert 33e9 < cfg.num_parameters() < 37e9
    assert 3e9 < cfg.num_active_parameters() < 4e9
    main(["agents_a1_35b_a3b"])
    out = capsys.readouterr().out
    assert f"{cfg.num_parameters():,}" in out and f"{cfg.num_active_parameters():,}" in out


def test_counts_equal_built_models():
    from megatron_a1.model.build import build_model
    from megatron_a1.model.parity import random_hf_model
    from megatron_a1.runtime import destroy, initialize

    for name in ("tiny", "tiny_test"):
        cfg = preset(name)
        assert sum(p.numel() for p in random_hf_model(cfg).parameters()) == cfg.num_parameters()
    rt = initialize(seed=0)
    try:
        cfg = preset("tiny")
        model = build_model(cfg, cfg.to_transformer_config(None), pg_collection=rt.pg_collection,
                            backend="local", max_seq_len=64)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
        norms = {n: m for n, m in model.named_modules() if hasattr(m, "zero_centered_gamma")}
        plain = {n for n, m in norms.items() if not m.zero_centered_gamma}
        assert plain == {n for n in norms if n.endswith("self_attention.out_norm")}  # GDN only
        assert len(plain) == sum(t == "linear_attention" for t in cfg.layer_types)
    finally:
        destroy()


def test_hf_config_round_trip_and_multimodal_config():
    cfg = preset("tiny")
    d = cfg.to_hf_config_dict()
    assert A1ModelConfig.from_hf_config(d, name="tiny") == cfg
    assert A1ModelConfig.from_hf_config(
        {"model_type": "qwen3_5_moe", "text_config": d}, name="tiny") == cfg
    hf_obj = Qwen3_5MoeTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert A1ModelConfig.from_hf_config(hf_obj, name="tiny") == cfg


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok"),
])
def test_unsupported_configs_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        A1ModelConfig.from_hf_config({**preset("tiny").to_hf_config_dict(), **change})


def test_interleaved_mrope_on_text_is_plain_partial_rope():
    """Text positions are equal on the three M-RoPE axes: the reference's cos/sin are those of
    plain RoPE (rotate-half layout) over the rotated dims, which is megatron's rotary_percent."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    c = Qwen3_5MoeTextConfig(head_dim=256, rope_parameters={
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
        "mrope_interleaved": True, "mrope_section": [11, 11, 10]})
    pos = torch.arange(300)[None]
    cos, sin = hf.Qwen3_5MoeTextRotaryEmbedding(c)(torch.zeros(1, dtype=torch.float32), pos)
    emb = RotaryEmbedding(kv_channels=256, rotary_percent=0.25, rotary_base=1e7,
                          use_cpu_initialization=True)(300)  # [s, 1, 1, 64] angles
    torch.testing.assert_close(cos[0], emb[:, 0, 0].cos(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[0], emb[:, 0, 0].sin(), rtol=1e-5, atol=1e-5)
