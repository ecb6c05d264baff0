"""pyhwp: hardware-aware pruning with sparse kernels that make pruned models faster."""

from importlib.metadata import PackageNotFoundError, version

from pyhwp.formats import CSRWeight, MaskedWeight, SparseWeight, to_sparse
from pyhwp.ops import linear

try:
    __version__ = version("pyhwp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["CSRWeight", "MaskedWeight", "SparseWeight", "__version__", "linear", "to_sparse"]
