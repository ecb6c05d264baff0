"""Kernel-aware pattern selection: per-layer candidates with measured latency and accuracy cost."""

from pyhwp.select.solver import Candidate, solve, useful_candidates

__all__ = ["Candidate", "solve", "useful_candidates"]
