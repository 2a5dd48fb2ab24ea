"""Numba's disk cache never serves a kernel compiled from sources that have changed since
(fastnet/backends/numba_cache.py), including a change in another file than the kernel's own.

The kernels are two small ones added to a copy of the package, so that each compile takes a moment:
the trap is numba's, the same for gemm called from dense_forward as for these."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fastnet

CALLEE = """
from numba import njit

@njit(cache=True)
def fill(out):
    out[:] = 8.0
"""

# The caller's file never changes; the callee's does, and numba checks a cached kernel only against its own file.
CALLER = """
from numba import njit
from fastnet.backends.probe_callee import fill

@njit(cache=True)
def first(out):
    fill(out)
    return out[0]
"""

RUN = """
import json
import numpy as np
from fastnet.backends import probe_caller as k
value = k.first(np.zeros(3))
print(json.dumps({"value": value, "from_cache": sum(k.first.stats.cache_hits.values()), "file": k.__file__}))
"""


def run_copy(root):
    done = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, check=True, cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)})
    result = json.loads(done.stdout.splitlines()[-1])
    assert result.pop("file") == str(root / "fastnet" / "backends" / "probe_caller.py")  # the copy's kernels
    return result


def test_a_changed_callee_in_another_file_is_compiled_again_and_an_unchanged_source_is_not(tmp_path):
    package = Path(fastnet.__file__).parent
    shutil.copytree(package, tmp_path / "fastnet", ignore=shutil.ignore_patterns("__pycache__"))
    backends = tmp_path / "fastnet" / "backends"
    (backends / "probe_caller.py").write_text(CALLER)
    (backends / "probe_callee.py").write_text(CALLEE)
    assert run_copy(tmp_path) == {"value": 8.0, "from_cache": 0}
    assert run_copy(tmp_path) == {"value": 8.0, "from_cache": 1}  # nothing changed: loaded, not compiled

    (backends / "probe_callee.py").write_text(CALLEE.replace("8.0", "7.0"))
    assert run_copy(tmp_path) == {"value": 7.0, "from_cache": 0}
