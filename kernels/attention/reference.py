"""Plain-PyTorch reference: ``scaled_dot_product_attention`` run on each document alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def packed_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *,
                               causal: bool = True, softmax_scale: float | None = None,
                               upcast: bool = False) -> Tensor:
    """Same contract as ``packed_attention`` (THD, GQA, rows past the last document are zero).

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [N + 1] cumulative document lengths.
        upcast: compute in fp64 (the oracle the tests measure every implementation against).

    Returns:
        [T, Hq, D] in q's dtype (fp64 when ``upcast``).
    """
    group = q.shape[1] // k.shape[1]
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [L, H, D] -> [H, L, D]; GQA by repeating each KV head for its query heads.
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale)
        out = out.index_copy(0, torch.arange(start, end, device=q.device), od.transpose(0, 1))
    return out
