"""Benchmarks runnable as `based bench ...` (GPU): ops.py times the kernels against fla and SDPA."""
