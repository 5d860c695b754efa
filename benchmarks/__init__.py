"""Benchmarks: run by hand (``python -m benchmarks.<name>``); they print numbers and ratios, CI does not run them."""
