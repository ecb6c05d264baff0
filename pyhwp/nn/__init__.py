"""Drop-in sparse layers (SparseLinear, SparseConv2d) and sparsify(model, plan)."""

from pyhwp.nn.conv import SparseConv2d
from pyhwp.nn.linear import SparseLinear
from pyhwp.nn.module import SparseModule
from pyhwp.nn.sparsify import SPARSE_TWINS, sparsify

__all__ = ["SPARSE_TWINS", "SparseConv2d", "SparseLinear", "SparseModule", "sparsify"]
