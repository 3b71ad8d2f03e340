"""Helpers for the test-suite that other test files (and users' tests) can import."""
from megatron_a1.testing.multirank import MultiRankError, run_multirank

__all__ = ["MultiRankError", "run_multirank"]
