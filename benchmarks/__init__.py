"""pcisplit benchmarks (run with ``make bench``). Results go to ``benchmarks/results/``."""
