"""Agents-A1 model on megatron-core: presets, layer specs, backend provider, CPU packed paths."""
