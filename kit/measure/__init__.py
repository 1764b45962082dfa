"""Measuring: MAC counting, timing and memory, the benchmarks beside escnn."""
