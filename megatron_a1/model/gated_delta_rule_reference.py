"""Naive gated delta rule and causal conv1d: one token at a time, one document at a time.

Written to be read, not to be fast: the oracle that :mod:`megatron_a1.model.gated_delta_rule`
is tested against. Same arguments and layouts as the fast functions there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _documents(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: the packed documents, or each batch row."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    assert B == 1, "packed input needs batch size 1"
    cu = cu_seqlens.tolist()
    return [(0, start, end) for start, end in zip(cu, cu[1:])]


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g, beta ``[B, T, HV]``; state ``[N, HV, K, V]``.

    For every document, starting from its initial state (or zeros), for t = start .. end - 1::

        S = exp(g_t) * S                              # decay
        S = S + beta_t * k_t (v_t - S^T k_t)^T        # delta rule: correct what S predicts for k_t
        o_t = scale * S^T q_t                         # read
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = K**-0.5
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = HV // H  # value head h reads query/key head h // group

    out = torch.zeros(B, T, HV, V, dtype=dtype, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(_documents(B, T, cu_seqlens)):
        heads = []
        for h in range(HV):
            S = (
                initial_state[n, h].to(dtype)
                if initial_state is not None
                else torch.zeros(K, V, dtype=dtype, device=q.device)
            )
            for t in range(start, end):
                q_t, k_t = q[b, t, h // group], k[b, t, h // group]
                S = torch.exp(g[b, t, h]) * S
                S = S + beta[b, t, h] * torch.outer(k_t, v[b, t, h] - S.T @ k_t)
                out[b, t, h] = scale * (S.T @ q_t)
            heads.append(S)
        finals.append(torch.stack(heads))
    final = torch.stack(finals) if output_final_state else None
    return out.to(v.dtype), final


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """x ``[B, T, D]``, weight ``[D, W]``: each output reads the current and W-1 previous
    tokens of its own document (earlier ones are zero)."""
    B, T, D = x.shape
    W = weight.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, wf = x.to(dtype), weight.to(dtype)
    y = torch.zeros(B, T, D, dtype=dtype, device=x.device)
    for b, start, end in _documents(B, T, cu_seqlens):
        for t in range(start, end):
            acc = bias.to(dtype).clone() if bias is not None else torch.zeros(D, dtype=dtype)
            for w in range(W):
                src = t - (W - 1) + w
                if src >= start:
                    acc = acc + wf[:, w] * xf[b, src]
            y[b, t] = acc
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.to(x.dtype)
