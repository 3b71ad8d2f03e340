"""Logits of our model and of transformers' ``Qwen3_5MoeForCausalLM`` on the same tokens.

Used by ``tools/check_parity.py`` and the parity tests. transformers binds flash-linear-attention's
kernels at import whenever ``fla`` is importable, and they fail on CPU: a CPU process that uses
transformers as the oracle must block it first (``sys.modules["fla"] = None`` and
``sys.modules["causal_conv1d"] = None``) before anything imports transformers or megatron-core's
Gated DeltaNet.
"""
from __future__ import annotations

import torch

from megatron_a1.model.config import A1ModelConfig


def as_cu_seqlens(cu_seqlens, n_tokens: int) -> torch.Tensor:
    """int32 ``[0, l0, l0 + l1, ..., T]`` (None: one document of ``n_tokens``), validated."""
    cu = torch.tensor([0, n_tokens]) if cu_seqlens is None else torch.as_tensor(cu_seqlens)
    cu = cu.to(torch.int32).flatten()
    if cu[0] != 0 or cu[-1] != n_tokens or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to {n_tokens}, got {cu.tolist()}")
    return cu


def position_ids_for(cu: torch.Tensor) -> torch.Tensor:
    """Positions restarting at every document: ``[0..l0-1, 0..l1-1, ...]``."""
    return torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])


def hf_logits(hf_model, input_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """transformers' logits, float32 ``[T, V]``, each document of the pack run alone."""
    cu = as_cu_seqlens(cu_seqlens, input_ids.numel())
    outs = []
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(hf_model(input_ids=input_ids[None, a:b], use_cache=False).logits[0].float())
    return torch.cat(outs)


def megatron_logits(model, input_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """Our model's logits, float32 ``[T, V]``, on one packed THD sequence (1 rank, no PP)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = as_cu_seqlens(cu_seqlens, input_ids.numel())
    max_len = int((cu[1:] - cu[:-1]).max())
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max_len, max_seqlen_kv=max_len)
    with torch.no_grad():
        logits = model(input_ids[None], position_ids_for(cu)[None], None, packed_seq_params=psp)
    return logits.reshape(input_ids.numel(), -1).float()


def build_from_checkpoint(cfg: A1ModelConfig, ckpt_dir: str, pg_collection, parallel=None,
                          **config_overrides):
    """This rank's model for ``parallel``, weights from a ``dist_checkpointing`` checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_a1.model.build import build_model

    tc = cfg.to_transformer_config(parallel, **config_overrides)
    model = build_model(cfg, tc, pg_collection=pg_collection, backend="local",
                        max_seq_len=min(cfg.max_position_embeddings, 4096))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    return model.eval()


def random_hf_model(cfg: A1ModelConfig, *, seed: int = 0, std: float = 0.1):
    """A random ``Qwen3_5MoeForCausalLM`` of architecture ``cfg`` (float32, eval mode).

    Weights are drawn with ``std`` (larger than the usual 0.02 so layout mistakes show in the
    logits) and every norm weight is perturbed, so a wrong zero-centring shows too.
    """
    from transformers import Qwen3_5MoeForCausalLM
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    d = {k: v for k, v in cfg.to_hf_config_dict().items() if k not in ("architectures", "model_type")}
    d["initializer_range"] = std
    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    return model
