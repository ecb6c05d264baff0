"""pyhwp: hardware-aware pruning with sparse kernels that make pruned models faster."""

from importlib.metadata import PackageNotFoundError, version

from pyhwp.formats import CSRWeight, MaskedWeight, Sparse24Weight, SparseWeight, to_sparse
from pyhwp.ops import conv2d, linear
from pyhwp import nn
from pyhwp.nn import sparsify

try:
    __version__ = version("pyhwp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from pyhwp.optimize import optimize  # noqa: E402 - the pipeline sits on everything above
from pyhwp.select import select_pattern  # noqa: E402

__all__ = ["CSRWeight", "MaskedWeight", "Sparse24Weight", "SparseWeight", "__version__", "conv2d", "linear", "nn", "sparsify",
           "to_sparse", "optimize", "select_pattern"]
