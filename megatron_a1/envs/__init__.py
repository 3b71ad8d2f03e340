"""Agent environments (issue 12): tools, effects and rewards per domain.

``make(domain)`` builds one ("search", "science", "instruction", "tool", or a user-registered
domain); see :mod:`megatron_a1.envs.base` for the API and :func:`register` to add one.
"""
from .base import (Environment, bundled_tasks, call_name_args, load_tasks, make, register,
                   registry)

__all__ = ["Environment", "bundled_tasks", "call_name_args", "load_tasks", "make", "register",
           "registry"]
