"""Trajectory data: rendering, loss masks, indexed datasets, packing and loading."""
