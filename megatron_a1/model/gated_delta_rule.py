"""Gated DeltaNet ops in plain PyTorch, exact on packed (THD) batches: the CPU path.

megatron-core 0.19.2's ``GatedDeltaNet`` takes three functions from flash-linear-attention
(``fla``), whose Triton kernels need a GPU. This module provides drop-ins with the same
arguments, tensor layouts and semantics, written in PyTorch (autograd gives the gradients):

* :func:`chunk_gated_delta_rule` - fla's ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``;
* :func:`causal_conv1d` - fla's ``fla.modules.convolution.causal_conv1d`` (depthwise, causal);
* :func:`l2norm` - fla's ``fla.modules.l2norm.l2norm``.

Packed input follows flash-attention's convention: batch size 1, documents concatenated along
the time axis, ``cu_seqlens`` (int, ``[N + 1]``, ``cu_seqlens[0] == 0``,
``cu_seqlens[-1] == T``) their boundaries. Neither the convolution nor the recurrent state ever
crosses a boundary: each document's output equals the document run alone.

The recurrence (per value head; state ``S`` is ``[K, V]``, reset to ``initial_state`` or zero at
every document start)::

    S_t = exp(g_t) * S_{t-1} + beta_t * k_t (v_t - exp(g_t) * S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t

The naive per-token loop is :mod:`megatron_a1.model.gated_delta_rule_reference` (the oracle).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "chunk_gated_delta_rule", "l2norm"]


def l2norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None):
    """``x / sqrt(sum(x**2, -1) + eps)`` over the last dim, in float32 (fla's ``l2norm``).

    Returns ``output_dtype`` (default: ``x.dtype``). float64 input is computed in float64.
    """
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the kernels' accumulation type)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {cu_seqlens.shape}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the packed length {total}, got {cu}"
        )
    return cu


def _seq_idx_from_cu_seqlens(cu: list[int], device) -> torch.Tensor:
    lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


# --------------------------------------------------------------------------------------------
# causal depthwise conv1d
# --------------------------------------------------------------------------------------------
_ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu}


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """Causal depthwise convolution that never reads across a document boundary.

    ``y[t, d] = act(bias[d] + sum_w weight[d, w] * x[t - (W - 1) + w, d])``, where inputs before
    the start of ``t``'s document (or of the sequence) count as zero: for each document, the
    same as ``nn.Conv1d(D, D, W, groups=D, padding=W - 1)`` cut to the first ``T`` outputs.

    Args:
        x: ``[B, T, D]`` (fla's layout; megatron-core passes ``[1, T, D]`` when packed).
        weight: ``[D, W]`` (``conv1d.weight.squeeze(1)``).
        bias: ``[D]`` or None.
        activation: None, ``"silu"`` or ``"swish"`` (the same function).
        initial_state, output_final_state: carried conv state (inference); not supported,
            must be None / False.
        cu_seqlens: int ``[N + 1]`` document boundaries (needs ``B == 1``).
        seq_idx: int ``[B, T]``, the document of each token (causal-conv1d's ``seq_idx``): the
            window stops where it changes. An alternative to ``cu_seqlens``.

    Returns:
        ``(y, None)``: ``y`` is ``[B, T, D]`` in ``x.dtype``, computed in float32 (float64 for
        float64 input); the second item stands for fla's final state.
    """
    if initial_state is not None or output_final_state:
        raise NotImplementedError(
            "causal_conv1d (PyTorch path): initial_state / output_final_state (a carried conv "
            "cache, used for inference) are not supported"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D={D}, W], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D={D}], got {tuple(bias.shape)}")
    if cu_seqlens is not None and seq_idx is not None:
        raise ValueError("give cu_seqlens or seq_idx, not both")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed input (cu_seqlens) needs batch size 1, got {B}")
        cu = _check_cu_seqlens(cu_seqlens, T)
        seq_idx = _seq_idx_from_cu_seqlens(cu, x.device).unsqueeze(0)
    elif seq_idx is not None and seq_idx.shape != (B, T):
        raise ValueError(f"seq_idx must be [B={B}, T={T}], got {tuple(seq_idx.shape)}")

    W = weight.shape[1]
    dtype = _compute_dtype(x, weight)
    xf, wf = x.to(dtype), weight.to(dtype)
    y = xf * wf[:, W - 1]  # the current token
    for s in range(1, min(W, T + 1)):  # the token s steps back
        shifted = F.pad(xf[:, : T - s], (0, 0, s, 0))
        if seq_idx is not None:
            same_doc = F.pad(seq_idx[:, s:] == seq_idx[:, : T - s], (s, 0), value=False)
            shifted = shifted * same_doc.unsqueeze(-1).to(dtype)
        y = y + shifted * wf[:, W - 1 - s]
    if bias is not None:
        y = y + bias.to(dtype)
    act = _ACTIVATIONS[activation]
    if act is not None:
        y = act(y)
    return y.to(x.dtype), None


# --------------------------------------------------------------------------------------------
# chunked gated delta rule
# --------------------------------------------------------------------------------------------
def chunk_gated_delta_rule(
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
    *,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunked along time, exact on packed documents (fla's signature).

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``; ``HV`` a multiple of ``H`` (grouped values: value head ``j`` reads
            query/key head ``j // (HV // H)``, i.e. ``repeat_interleave`` of q/k).
        g: ``[B, T, HV]``, log of the per-step state decay (``<= 0``).
        beta: ``[B, T, HV]``, write strength (post-sigmoid).
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]``, one per sequence (``N`` = documents when packed,
            else ``B``); default zeros.
        output_final_state: also return the state after each sequence's last token.
        use_qk_l2norm_in_kernel: L2-normalise q and k over ``K`` first (eps 1e-6, float32).
        cu_seqlens: int ``[N + 1]`` document boundaries for packed input (needs ``B == 1``).
        chunk_size: tokens per chunk; chunks never straddle documents.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, HV, V]`` in ``v.dtype``; ``final_state`` is
        ``[N, HV, K, V]`` in float32 (float64 for float64 input), or None.

    All arithmetic is in float32 (float64 when any input is float64). Each document is cut into
    chunks, its last one padded (padding has ``k = v = beta = g = 0``, so it changes no state):
    memory is ``O(T + N * chunk_size)``. The intra-chunk work is batched over every chunk; the
    scan runs ``max chunks per document`` steps, each over the documents that have that chunk.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, HV, V], got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of query/key heads ({H})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B={B}, T={T}, HV={HV}], got {tuple(t.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed input (cu_seqlens) needs batch size 1, got {B}")
        cu = _check_cu_seqlens(cu_seqlens, T)
    else:
        cu = [b * T for b in range(B + 1)]  # each batch row is one sequence
    N = len(cu) - 1
    if initial_state is not None and initial_state.shape != (N, HV, K, V):
        raise ValueError(
            f"initial_state must be [N={N}, HV={HV}, K={K}, V={V}], got {tuple(initial_state.shape)}"
        )

    dtype = _compute_dtype(q, k, v, g, beta)
    out_dtype = v.dtype
    if scale is None:
        scale = K**-0.5
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if HV != H:
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)
    q = q * scale

    C = chunk_size
    order, slot_of_token, steps = _chunk_layout([b - a for a, b in zip(cu, cu[1:])], C)
    order, slot_of_token = order.to(q.device), slot_of_token.to(q.device)
    n_slots = steps[-1][0] * C if steps else 0
    src = torch.full((n_slots,), B * T, dtype=torch.long, device=q.device)  # B*T: a zero row
    src[slot_of_token] = torch.arange(B * T, device=q.device)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, HV, *D] -> [chunks, HV, C, *D]
        flat = x.to(dtype).reshape(B * T, *x.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return flat.index_select(0, src).unflatten(0, (-1, C)).transpose(1, 2).contiguous()

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))

    # Intra-chunk (batched over all chunks). gc: decay accumulated from the chunk start.
    gc = g.cumsum(-1)  # [chunks, HV, C]
    diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)  # [..., i, j] = gc_i - gc_j
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~causal, float("-inf")).exp()  # exp(gc_i - gc_j), j <= i, else 0
    k_beta = k * beta.unsqueeze(-1)
    # Unit lower-triangular system (I + A) with A_ij = beta_i exp(gc_i - gc_j) k_i.k_j, j < i.
    # Its solution against beta*v and beta*exp(gc)*k gives, for a chunk starting from state S,
    # the per-token state corrections u = u_v - w @ S.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * gc.exp().unsqueeze(-1)], dim=-1)
    u_v, w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split(
        [V, K], dim=-1
    )
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk q.k with decay, j <= i
    q_decayed = q * gc.exp().unsqueeze(-1)  # reads the state entering the chunk
    k_decayed = k * (gc[..., -1:] - gc).exp().unsqueeze(-1)  # writes to the state leaving it
    chunk_decay = gc[..., -1].exp()[..., None, None]  # [chunks, HV, 1, 1]

    # Inter-chunk scan. Documents are ranked longest first; step c holds chunk c of the m_c
    # documents that have one, as the contiguous chunk range [end - m_c, end).
    if initial_state is None:
        state = q.new_zeros(N, HV, K, V)
    else:
        state = initial_state.to(dtype).index_select(0, order)
    outputs = []
    for end, m in steps:
        sl = slice(end - m, end)
        S = state[:m]
        u = u_v[sl] - w[sl] @ S
        outputs.append(q_decayed[sl] @ S + attn[sl] @ u)
        S = S * chunk_decay[sl] + k_decayed[sl].transpose(-1, -2) @ u
        state = torch.cat([S, state[m:]]) if m < N else S

    o = torch.cat(outputs) if outputs else q.new_zeros(0, HV, C, V)  # [chunks, HV, C, V]
    o = o.transpose(1, 2).reshape(n_slots, HV, V).index_select(0, slot_of_token)
    o = o.reshape(B, T, HV, V).to(out_dtype)
    if not output_final_state:
        return o, None
    return o, torch.empty_like(state).index_copy(0, order, state)  # back to document order


def _chunk_layout(lengths: list[int], C: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Where each token goes in the flat, step-major list of chunks.

    Documents are split into chunks of ``C`` tokens (the last one padded) and ranked longest
    first. Chunks are ordered by their index inside the document (the scan step) first, then by
    document rank, so every scan step reads one contiguous range of chunks and the documents
    still running are a prefix of the rank order.

    Returns ``order`` (document of each rank), ``slot_of_token`` (``[sum(lengths)]``: the token's
    index ``chunk * C + position`` in the padded flat list) and ``steps``, one
    ``(end chunk, documents active)`` per scan step.
    """
    chunks = [-(-n // C) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda n: -lengths[n])
    steps, offsets, end = [], [], 0
    for c in range(max(chunks, default=0)):
        active = sum(1 for n in chunks if n > c)
        offsets.append(end)
        end += active
        steps.append((end, active))
    offsets = torch.tensor(offsets, dtype=torch.long)
    rank = {n: r for r, n in enumerate(order)}
    slots = [torch.zeros(0, dtype=torch.long)]
    for n, length in enumerate(lengths):  # token order
        pos = torch.arange(length)
        slots.append((offsets[pos // C] + rank[n]) * C + pos % C if length else pos)
    return torch.tensor(order, dtype=torch.long), torch.cat(slots), steps
