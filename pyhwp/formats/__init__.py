"""Storage patterns of pruned weights: SparseWeight and its subclasses, and to_sparse."""

from pyhwp.formats.base import SparseWeight, patterns, register_pattern, to_sparse
from pyhwp.formats.csr import CSRWeight
from pyhwp.formats.masked import MaskedWeight
from pyhwp.formats.sparse24 import Sparse24Weight

__all__ = ["CSRWeight", "MaskedWeight", "Sparse24Weight", "SparseWeight", "patterns", "register_pattern", "to_sparse"]
