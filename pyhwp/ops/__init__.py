"""Ops on SparseWeight: public functions, torch.library custom ops and their references."""

from pyhwp.ops.linear import linear
from pyhwp.ops.reference import linear_reference

__all__ = ["linear", "linear_reference"]
