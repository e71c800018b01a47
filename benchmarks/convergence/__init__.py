"""Convergence benchmark: swarmtrain (DiLoCo, plain averaging, int8) against a single peer and torch DDP.

`python -m benchmarks.convergence` runs it; harness.py runs one variant; baseline.py is the
single-process / DDP trainer; report.py writes the table, the plot and docs/benchmarks.md.
"""
