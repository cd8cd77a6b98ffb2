"""Benchmark of the results path against a reproduction of upstream's HTTP receiver (see run.py)."""
