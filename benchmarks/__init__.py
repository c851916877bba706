"""Benchmarks of autoep, run from a checkout: ``nox -s bench`` or ``python -m benchmarks.moe_layer``.

Benchmarks report times and ratios; they never assert wall-clock limits.
"""
