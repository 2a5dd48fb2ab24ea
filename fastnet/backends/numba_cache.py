"""Numba's disk cache, kept in step with every source its kernels are compiled from.

Numba checks a cached kernel against its own file only: when numba_gemm.gemm changes, the kernels of
numba_dense that call it are loaded from the cache as they were compiled, calling the old gemm, and so
are kernels that read a constant from another file (numba_dense reads GELU's from numpy_backend). A
pip upgrade rewrites every file, which refreshes every stamp, but whoever edits a kernel here would
run the old one without being told. So at import, before any kernel can load, the kernels cached
beside these sources are dropped whenever any source in this folder changed since they were cached.

Only the cache in this folder's __pycache__ is kept so. Where that folder cannot be written (an install
that is not the user's), Numba caches elsewhere, and nobody edits the sources there; with
NUMBA_CACHE_DIR set, Numba caches in that folder, which whoever edits a kernel clears by hand.
"""

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
STAMP = "fastnet-kernel-sources.sha256"  # in __pycache__: the digest of the sources its kernels are from


def sources_digest(folder=FOLDER):
    """The SHA-256 of every Python source in `folder`, names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def drop_stale_kernels(folder=FOLDER):
    """Delete the kernels Numba cached in folder/__pycache__ (*.nbi, *.nbc) if the sources in `folder`
    changed since the last call, and record the sources' digest. Processes that start together (the
    ranks of a data-parallel run, a test suite's workers) take turns under a lock, and only the first
    deletes: the others find the digest already recorded. A cache that cannot be written is left alone."""
    cache = folder / "__pycache__"
    with contextlib.suppress(OSError):
        digest = sources_digest(folder)
        cache.mkdir(exist_ok=True)
        with open(cache / (STAMP + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stamp = cache / STAMP
            if stamp.exists() and stamp.read_text() == digest:
                return
            for compiled in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
                compiled.unlink(missing_ok=True)
            temporary = stamp.with_name(f"{STAMP}.{os.getpid()}")
            temporary.write_text(digest)
            os.replace(temporary, stamp)
