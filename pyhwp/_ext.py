"""Loads the compiled core pyhwp._C and says clearly what to do when it is missing."""

from __future__ import annotations

try:
    from pyhwp import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on broken installs
    raise ImportError(
        "pyhwp's compiled extension pyhwp._C could not be imported "
        f"({exc}). Reinstall with `pip install .` from a source checkout "
        "(needs a C++17 compiler and cmake >= 3.24)."
    ) from exc

__all__ = ["_C"]
