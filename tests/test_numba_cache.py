"""Numba's disk cache never serves a kernel compiled from sources that have changed since
(fastnet/backends/numba_cache.py), including a change in another file than the kernel's own."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fastnet

# dense_forward (numba_dense.py) calls gemm (numba_gemm.py) for each tile: out = x @ W + b.
RUN = """
import json
import numpy as np
from fastnet.backends import numba_backend as k
out = np.empty((4, 32), np.float32)
k.dense_forward(np.ones((4, 8), np.float32), np.ones((8, 32), np.float32), np.zeros(32, np.float32), out)
print(json.dumps({"value": float(out[0, 0]), "from_cache": sum(k.dense_forward.compiled.stats.cache_hits.values()),
                  "file": k.__file__}))
"""


def run_copy(root):
    done = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, check=True, cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)})
    result = json.loads(done.stdout.splitlines()[-1])
    assert result.pop("file") == str(root / "fastnet" / "backends" / "numba_backend.py")  # the copy's kernels
    return result


def test_a_changed_callee_in_another_file_is_compiled_again_and_an_unchanged_source_is_not(tmp_path):
    package = Path(fastnet.__file__).parent
    shutil.copytree(package, tmp_path / "fastnet", ignore=shutil.ignore_patterns("__pycache__"))
    assert run_copy(tmp_path) == {"value": 8.0, "from_cache": 0}
    assert run_copy(tmp_path) == {"value": 8.0, "from_cache": 1}  # nothing changed: loaded, not compiled

    gemm_file = tmp_path / "fastnet" / "backends" / "numba_gemm.py"
    source = gemm_file.read_text()
    body = '    """out = a @ b as one BLAS call'
    assert source.count(body) == 1
    # Every product now writes 7: dense_forward's own file is unchanged, its cached kernel is not valid.
    gemm_file.write_text(source.replace(body, "    out[:, :] = 7\n    return\n" + body))
    assert run_copy(tmp_path) == {"value": 7.0, "from_cache": 0}
