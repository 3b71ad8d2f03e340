"""SVA loss (Salient Vocabulary Alignment, DESIGN.md §4): Triton kernels with PyTorch references.

Public names:
    sva_loss                  per-position loss from [N, V_local] student/teacher logits
    fused_linear_sva          the same from hidden states and LM-head weights, chunked over tokens
    sva_from_topk             the same from a precomputed teacher top-k (ids + logits per position)
    domain_normalized_loss    the stage-3 objective: sample → domain → mean over domains present
    DomainLoss                its result (``loss`` to backward, ``value`` to log)
The plain-PyTorch oracles are in ``a1_kernels.sva.reference``; launch configs for ahead-of-time
compilation in ``a1_kernels.sva.aot``.
"""
from .from_topk import sva_from_topk
from .fused_linear import fused_linear_sva
from .objective import DomainLoss, domain_normalized_loss
from .sva import sva_loss

__all__ = ["sva_loss", "fused_linear_sva", "sva_from_topk", "domain_normalized_loss", "DomainLoss"]
