"""fused_linear_cross_entropy on one rank: values and gradients against the plain-PyTorch oracle
(Triton kernels under the interpreter, and the chunked PyTorch path), bf16 error against
PyTorch's own, input checks, and peak memory that grows with the chunk, not with N.

The vocab-parallel path against megatron-core is in ``test_cross_entropy_parallel.py``.
"""
import pytest
import torch

from a1_kernels.cross_entropy import fused_linear_cross_entropy
from a1_kernels.cross_entropy.kernels import chunk_grad_, chunk_stats
from a1_kernels.cross_entropy.reference import (chunk_grad_reference_, chunk_stats_reference,
                                                fused_linear_cross_entropy_reference)
from megatron_a1.storage_tracker import StorageTracker


def _problem(n, h, v, seed, dtype=torch.float32, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    grad_out = torch.rand(n, generator=g) + 0.5
    return hidden, weight, labels, grad_out


def _run(fn, hidden, weight, labels, grad_out, **kw):
    a, b = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fn(a, b, labels, **kw)
    loss.backward(grad_out)
    return loss.detach(), a.grad, b.grad


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Triton kernels (interpreted on CPU) or the chunked PyTorch path a CPU without the
    interpreter takes: the launcher reads TRITON_INTERPRET at call time."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


# (n, h, v, chunk): ragged last chunks, one chunk larger than N, V not a multiple of the tile
CASES = [(37, 16, 300, 8), (50, 8, 129, 7), (5, 24, 77, 64), (64, 12, 256, 16)]


@pytest.mark.parametrize("n,h,v,chunk", CASES)
def test_values_and_gradients_equal_reference(path, n, h, v, chunk):
    hidden, weight, labels, grad_out = _problem(n, h, v, seed=n + v)
    ours = _run(fused_linear_cross_entropy, hidden, weight, labels, grad_out, chunk_size=chunk)
    ref = _run(fused_linear_cross_entropy_reference, hidden, weight, labels, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    ignored = labels == -100
    assert ignored.any() and (~ignored).any()
    assert not ours[0][ignored].any() and not ours[1][ignored].any()
    assert ours[0][~ignored].min() > 0


def test_all_ignored_gives_zero_loss_and_gradients(path):
    hidden, weight, labels, grad_out = _problem(9, 8, 40, seed=1)
    loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, torch.full_like(labels, -100),
                        grad_out, chunk_size=4)
    assert loss.shape == (9,) and not loss.any() and not gh.any() and not gw.any()
    custom = _run(fused_linear_cross_entropy, hidden, weight, torch.where(labels == 3, -100, 7),
                  grad_out, chunk_size=4, ignore_index=7)  # another ignore_index
    assert not custom[0].any()


def test_chunk_kernels_equal_reference():
    """The two Triton kernels alone against their PyTorch definitions, bf16 and fp32 logits,
    a non-owned target (-1), a row with a huge logit, odd widths."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(21, 301, generator=g) * 4).to(dtype)
        z[3, 17] = 80.0
        target = torch.randint(0, 301, (21,), generator=g, dtype=torch.int32)
        target[[0, 9]] = -1
        for a, b in zip(chunk_stats(z, target), chunk_stats_reference(z, target)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        lse = torch.logsumexp(z.float(), dim=1)
        grad = torch.rand(21, generator=g)
        ours, ref = z.clone(), z.clone()
        chunk_grad_(ours, target, lse, grad)
        chunk_grad_reference_(ref, target, lse, grad)
        # same fp32 maths, one rounding to the logits' dtype (to nearest even, as torch)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_bf16_error_within_pytorch_bf16_error():
    """bf16 inputs: our error against the fp32 oracle is no larger than (twice) PyTorch's own bf16
    path's — logits rounded to bf16 by the matmul, cross-entropy in fp32, the logits' gradient
    back in bf16 (what megatron-core's output layer + cross-entropy do)."""
    n, h, v = 70, 32, 500
    hidden, weight, labels, grad_out = _problem(n, h, v, seed=7, dtype=torch.bfloat16)

    def torch_bf16(a, b, lab):
        logits = (a @ b.t()).float()
        keep = lab != -100
        loss = torch.nn.functional.cross_entropy(logits, lab.clamp(min=0), reduction="none")
        return torch.where(keep, loss, torch.zeros_like(loss))

    exact = _run(fused_linear_cross_entropy_reference, hidden.float(), weight.float(), labels,
                 grad_out)
    ours = _run(fused_linear_cross_entropy, hidden, weight, labels, grad_out, chunk_size=16)
    pt = _run(torch_bf16, hidden, weight, labels, grad_out)
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16 and ours[0].dtype == torch.float32
    for name, o, p, e in zip(("loss", "grad_hidden", "grad_weight"), ours, pt, exact):
        err_ours = (o.float() - e).abs().max().item()
        err_pt = (p.float() - e).abs().max().item()
        assert err_pt > 0, name
        assert err_ours <= 2 * err_pt + 1e-6, (name, err_ours, err_pt)


def test_input_errors():
    hidden, weight, labels, _ = _problem(6, 8, 20, seed=2)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, 20))
    with pytest.raises(ValueError, match="disagree on H"):
        fused_linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(TypeError, match="share"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


def _peak_bytes(n, v, h, chunk, fn=fused_linear_cross_entropy):
    hidden, weight, labels, grad_out = _problem(n, h, v, seed=0, ignored=0.0)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with StorageTracker() as mem:  # every tensor storage alive at once, not the process RSS
        loss = fn(hidden, weight, labels, **({"chunk_size": chunk} if chunk else {}))
        loss.backward(grad_out)
        del loss
    return mem.peak


def test_peak_memory_grows_with_the_chunk_not_with_n(monkeypatch):
    """N = 1,024 → 8,192 tokens at V = 8,192: the loss's peak grows by O(ΔN·H) (hidden gradient,
    per-token vectors), nowhere near the ΔN·V·4 bytes of fp32 logits; the full-logits reference
    grows by more than that per token (the tracker sees real allocations)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # same chunk loop; the interpreter is too slow here
    v, h, chunk = 8192, 16, 512
    small, large = _peak_bytes(1024, v, h, chunk), _peak_bytes(8192, v, h, chunk)
    delta_logits = (8192 - 1024) * v * 4
    assert large - small < 0.05 * delta_logits, (small, large)
    assert large < 2 * chunk * v * 4 * 4  # a few fp32 chunk-sized buffers, whatever N is
    ref_growth = (_peak_bytes(2048, v, h, None, fused_linear_cross_entropy_reference)
                  - _peak_bytes(1024, v, h, None, fused_linear_cross_entropy_reference))
    assert ref_growth > 1024 * v * 4


def test_grpo_logprobs_peak_memory_grows_with_the_chunk_not_with_n(monkeypatch):
    """GRPO's log-probs and entropy (``training.logprobs.token_logprobs``, the other loss head
    on the output layer) keep the same property: no [T, V] tensor in forward or backward."""
    from megatron_a1.training.logprobs import token_logprobs

    def head(hidden, weight, labels, chunk_size):
        logp, entropy = token_logprobs(hidden, weight, labels, chunk_size=chunk_size,
                                       with_entropy=True)
        return logp + entropy

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    v, h, chunk = 4096, 16, 256
    small, large = _peak_bytes(256, v, h, chunk, head), _peak_bytes(2048, v, h, chunk, head)
    assert large - small < 0.05 * (2048 - 256) * v * 4, (small, large)


@pytest.mark.slow
def test_launchers_are_torch_library_ops():
    """Schema, fake (meta) implementations and AOT-dispatch tracing of both launchers: what
    torch.compile needs to trace through the loss."""
    z = torch.randn(5, 40)
    target = torch.tensor([1, -1, 3, 39, 0], dtype=torch.int32)
    torch.library.opcheck(chunk_stats, (z, target))
    torch.library.opcheck(chunk_grad_, (z.clone(), target, torch.logsumexp(z, 1), torch.rand(5)))


def test_sft_config_keys():
    """``sft.fused_loss`` is on by default; a chunk size below 1 is a config error naming it."""
    from megatron_a1.configs import ConfigError, load_config
    from megatron_a1.training.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["sft.chunk_size=0"])
    assert cfg.sft.fused_loss is True
    with pytest.raises(ConfigError, match="sft.chunk_size must be >= 1"):
        cfg.validate(1, dry_run=True)
