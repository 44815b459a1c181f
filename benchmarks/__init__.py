"""Benchmarks against peers and the hardware; `python -m benchmarks.run_all` runs them all."""
