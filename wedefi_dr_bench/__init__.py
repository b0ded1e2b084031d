"""Benchmarks: each flow measured against the bare tools in the same run."""
