"""Rollouts: on-policy agent trajectories in token ids.

Public: :func:`parse_assistant` (Qwen3.5 tool-call parser), the engine interface
(:class:`SamplingParams`, :class:`Generation`, :class:`Engine`). The agent loop is
:mod:`megatron_a1.rollout.agent`; engines are :mod:`megatron_a1.rollout.embedded` and
:mod:`megatron_a1.rollout.http` (imported on use: the embedded one pulls in megatron-core).
"""
from .engine import Engine, Generation, SamplingParams
from .parse import parse_assistant

__all__ = ["Engine", "Generation", "SamplingParams", "parse_assistant"]
