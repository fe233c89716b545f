"""Benchmarks (not tests): ``python -m kvpress_rs.bench <command>`` (or a module run as
``python -m kvpress_rs.bench.<name>``). Each compares against a baseline measured in the
same run and reports ratios."""
