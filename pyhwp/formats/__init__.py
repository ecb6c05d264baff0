"""Storage patterns of pruned weights: SparseWeight and its subclasses, and to_sparse."""

from pyhwp.formats.base import SparseWeight, patterns, register_pattern, to_sparse
from pyhwp.formats.csr import CSRWeight

__all__ = ["CSRWeight", "SparseWeight", "patterns", "register_pattern", "to_sparse"]
