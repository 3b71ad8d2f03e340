"""RMSNorm for the local (non-Transformer-Engine) backend.

megatron-core's local ``WrappedTorchNorm`` rejects two things this model needs:
* ``layernorm_zero_centered_gamma``: Qwen3.5 stores norm weights centred at zero and scales by
  ``(1 + w)``, computed in float32 and cast back (transformers' ``Qwen3_5MoeRMSNorm``);
* ``sequence_parallel``: MoE with tensor parallelism requires it. Nothing in the norm itself
  changes under sequence parallelism; the weight is marked ``sequence_parallel`` so that
  megatron-core's ``finalize_model_grads`` all-reduces its gradient over the TP group (each rank
  saw a different slice of the sequence).
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = x / rms(x) * w`` (or ``* (1 + w)`` when zero-centred); float32 inside.

    Follows megatron-core's ``LayerNormBuilder`` protocol: ``RMSNorm(config=, hidden_size=, eps=)``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        y = y * (1.0 + w if self.zero_centered_gamma else w)
        return y.to(x.dtype)
