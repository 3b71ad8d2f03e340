"""Cross-entropy fused with the output layer: the SFT loss without [T, V] logits.

Public names:
    fused_linear_cross_entropy   per-token loss from hidden states and the output-layer weight,
                                 chunked over tokens, vocab-parallel under tensor parallelism
The plain-PyTorch oracles are in ``a1_kernels.cross_entropy.reference``; launch configs for
ahead-of-time compilation in ``a1_kernels.cross_entropy.aot``.
"""
from .fused_linear import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
