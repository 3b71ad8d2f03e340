"""SVA loss (Salient Vocabulary Alignment, DESIGN.md §4): Triton kernels with PyTorch references.

Public names:
    sva_loss                  per-position loss from [N, V_local] student/teacher logits
    fused_linear_sva          the same from hidden states and LM-head weights, chunked over tokens
    domain_normalized_loss    the stage-3 objective: sample → domain → mean over domains present
    DomainLoss                its result (``loss`` to backward, ``value`` to log)
The plain-PyTorch oracles are in ``a1_kernels.sva.reference``; launch configs for ahead-of-time
compilation in ``a1_kernels.sva.aot``.
"""
from .fused_linear import fused_linear_sva
from .objective import DomainLoss, domain_normalized_loss
from .sva import sva_loss

__all__ = ["sva_loss", "fused_linear_sva", "domain_normalized_loss", "DomainLoss"]
