"""Training: megatron-core DDP + distributed optimizer + pipeline schedules, and the stage losses."""
