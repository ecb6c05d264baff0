"""The user cache directory and its JSON files, each stamped with a fingerprint and the code version."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyhwp


@functools.cache
def _extension_digest() -> str:
    from pyhwp._ext import _C

    h = hashlib.sha1()
    with open(_C.__file__, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def code_version() -> str:
    """pyhwp.__version__ plus a digest of the compiled extension: what cached measurements were
    taken with. Measurements of kernels that have since been rebuilt (a source checkout, or a
    reinstall under the same version number) are then stale, not silently reused."""
    return f"{pyhwp.__version__}+{_extension_digest()}"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else $XDG_CACHE_HOME/pyhwp, else ~/.cache/pyhwp (not created here)."""
    if override is not None:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pyhwp"


def load(path: Path, fingerprint: str, version: str) -> dict:
    """The `data` stored in `path` if it was written for this fingerprint and code version, else {}.

    A file for another machine, another pyhwp, or a damaged file is treated as empty; the next
    store() replaces it, which is how a changed fingerprint or version invalidates the cache.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint or doc.get("pyhwp") != version:
        return {}
    data = doc.get("data")
    return data if isinstance(data, dict) else {}


def store(path: Path, fingerprint: str, version: str, data: dict) -> None:
    """Write `data` with its stamp atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"fingerprint": fingerprint, "pyhwp": version, "data": data}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
