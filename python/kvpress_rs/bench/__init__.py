"""Benchmarks (not tests): ``python -m kvpress_rs.bench <command>``. Each compares against a
baseline measured in the same run and reports ratios."""
