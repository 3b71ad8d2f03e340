"""Rollouts: on-policy agent trajectories (issue 12). Public: :func:`parse_assistant`."""
from .parse import parse_assistant

__all__ = ["parse_assistant"]
