"""megatron_a1: Megatron-core based training of Agents-A1 (Qwen3.5-35B-A3B hybrid MoE)."""

__version__ = "0.1.0"
