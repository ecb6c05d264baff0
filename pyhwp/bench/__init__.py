"""Benchmark machinery shared by `pyhwp bench`, `pyhwp profile` and bench/ (timing, cases)."""
