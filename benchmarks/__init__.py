"""Benchmarks: scripts that measure and write ``benchmarks/results/NAME.json`` + ``NAME.png``."""
