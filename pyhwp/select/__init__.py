"""Kernel-aware pattern selection: per-layer candidates with measured latency and accuracy cost."""

from pyhwp.select.api import Selection, select_pattern
from pyhwp.select.solver import Candidate, solve, useful_candidates

__all__ = ["Candidate", "Selection", "select_pattern", "solve", "useful_candidates"]
