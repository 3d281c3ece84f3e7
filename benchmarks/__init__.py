"""Benchmarks (python -m benchmarks.<name>); not part of the installed package."""
