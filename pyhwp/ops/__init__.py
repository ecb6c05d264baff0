"""Ops on SparseWeight: public functions, torch.library custom ops and their references."""

from pyhwp.ops.conv2d import conv2d
from pyhwp.ops.linear import linear
from pyhwp.ops.reference import conv2d_reference, linear_reference

__all__ = ["conv2d", "conv2d_reference", "linear", "linear_reference"]
