"""The one interface every generation engine implements (token ids in, token ids out).

The agent loop (:mod:`megatron_a1.rollout.agent`) never sees text it has to tokenise again: it
hands an engine the rendered prompt ids and appends exactly the ids the engine sampled, with the
engine's log-probability of each. Engines:

* :class:`megatron_a1.rollout.embedded.EmbeddedEngine` — in-process incremental sampler on our own
  megatron-core model (KV cache for attention, recurrent state for Gated DeltaNet); CPU demo/tests.
* :class:`megatron_a1.rollout.http.HTTPEngine` — vLLM (``/inference/v1/generate``) or SGLang
  (``/generate``) servers, many requests in flight, timeouts and retries.

``weight_version`` is the version of the policy weights the engine samples with; every
generation carries the version it was sampled with so the trainer can bound staleness.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    top_k: int = -1
    """Sample among the k most likely tokens (-1: off)."""
    max_tokens: int = 512
    """Most tokens to sample for this request."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Sampling stops after emitting one of these (it is included in the output)."""
    seed: int | None = None
    """Per-request seed (None: the engine's generator)."""


@dataclass(kw_only=True)
class Generation:
    token_ids: list[int]
    """Sampled ids, exactly as sampled (a stop token included)."""
    logprobs: list[float]
    """The engine's log-probability of each sampled id (under the sampling distribution's
    logits before temperature/top-p/top-k, i.e. the policy's own log-probability)."""
    finish_reason: str
    """``"stop"`` (a stop token was sampled) or ``"length"`` (``max_tokens`` reached)."""
    weight_version: int = 0
    """Version of the weights that sampled it."""


@runtime_checkable
class Engine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        """One generation per prompt (prompt = token ids), in order."""
        ...
