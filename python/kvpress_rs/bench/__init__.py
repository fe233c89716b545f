"""Benchmarks (not tests): run each as ``python -m kvpress_rs.bench.<name>``."""
