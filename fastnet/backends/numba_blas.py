"""The BLAS that the Numba backend's GEMM driver (numba_gemm.py) calls, and CBLAS's enum values that
every call passes: which library is found at import (MKL or OpenBLAS, through its 64-bit-integer
CBLAS interface), and which multiplies bfloat16 operands.

Finding them needs no Numba (but for the stand-in bf16 GEMM, numba_bf16.reference_gemm, when MKL
is missing): numba_plan asks which libraries are installed without starting the driver.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np
from threadpoolctl import threadpool_info

from fastnet import cpu
from fastnet.errors import VariableError

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS's enum values
MKL_THREADING_SEQUENTIAL = 1


class Blas:
    """The library the driver calls: its name ('openblas' or 'mkl'), file, and kernel type."""

    def __init__(self, name, path, sgemm, dgemm, architecture=None, version=None):
        self.name, self.path, self.architecture, self.version = name, path, architecture, version
        self.sgemm, self.dgemm = sgemm, dgemm

    def describe(self):
        kernel = f" {self.architecture}" if self.architecture else ""
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version}{kernel}"


def _mkl_path():
    prefixes = [sys.prefix, sys.base_prefix]
    for prefix in prefixes:
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return ctypes.util.find_library("mkl_rt")


def _openblas_candidates():
    """OpenBLAS libraries loaded in this process, NumPy's first. NumPy's wheels bring an ILP64 build
    (0.3.31 as of NumPy 2.4), whose one-thread sgemm ran R1's products faster than SciPy's LP64
    0.3.30, which Numba's own np.dot calls (benchmarks/RESULTS.md)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS, so that it is held too)
    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))
    libraries = [lib for lib in threadpool_info() if lib["internal_api"] == "openblas"]
    libraries.sort(key=lambda lib: not os.path.abspath(lib["filepath"]).startswith(numpy_dir))
    return libraries


def _symbol(dll, names):
    for name in names:
        try:
            return ctypes.cast(getattr(dll, name), ctypes.c_void_p).value
        except AttributeError:
            continue
    return None


def find_blas(choice=None):
    """The BLAS to call: `choice` or $FASTNET_BLAS ('mkl' or 'openblas') when set (the module passes the
    measured plan's, numba_plan); else MKL on Intel CPUs where the mkl package is installed, and
    OpenBLAS otherwise: on an AMD EPYC (Zen 3) MKL's one-thread sgemm was slower on the weight
    gradient's shapes, so there OpenBLAS, which NumPy and SciPy bring anyway, stays. A measured plan
    (fastnet plan --measure) replaces this rule."""
    choice = choice or os.environ.get("FASTNET_BLAS")
    if choice not in (None, "mkl", "openblas"):
        raise VariableError(f"FASTNET_BLAS={choice!r} is not a BLAS fastnet can drive: set it to mkl or openblas")
    mkl = _mkl_path() if choice in (None, "mkl") else None
    if choice == "mkl" and mkl is None:
        raise VariableError("FASTNET_BLAS=mkl but MKL is not installed: pip install mkl, or unset FASTNET_BLAS")
    if mkl and (choice == "mkl" or cpu.vendor() == "GenuineIntel"):
        dll, version = _open_mkl(mkl)
        sgemm, dgemm = _symbol(dll, ["cblas_sgemm_64"]), _symbol(dll, ["cblas_dgemm_64"])
        if sgemm and dgemm:
            return Blas("mkl", mkl, sgemm, dgemm, version=version)
        if choice == "mkl":
            raise VariableError(f"FASTNET_BLAS=mkl but {mkl} has no ILP64 interface (cblas_sgemm_64): "
                                "pip install -U mkl")
    for lib in _openblas_candidates():
        dll = ctypes.CDLL(lib["filepath"])
        sgemm = _symbol(dll, ["scipy_cblas_sgemm64_", "cblas_sgemm64_"])
        dgemm = _symbol(dll, ["scipy_cblas_dgemm64_", "cblas_dgemm64_"])
        if sgemm and dgemm:
            return Blas("openblas", lib["filepath"], sgemm, dgemm, lib.get("architecture"), lib.get("version"))
    raise ImportError("the numba backend needs a BLAS with a 64-bit-integer CBLAS interface, which NumPy's "
                      "wheels bring: pip install --force-reinstall numpy, or pip install mkl")


def _open_mkl(path):
    """MKL's library, on its sequential threading layer, and its version string."""
    dll = ctypes.CDLL(path)
    dll.MKL_Set_Threading_Layer(MKL_THREADING_SEQUENTIAL)  # before any other MKL call
    version = ctypes.create_string_buffer(256)
    dll.MKL_Get_Version_String(version, 256)
    return dll, version.value.decode(errors="replace").strip()


class Bf16Gemm:
    """The library of the bfloat16 GEMM (bf16 operands, float32 products and output): its name, file
    and version, or 'none' when only numba_bf16.reference_gemm's loops stand in."""

    def __init__(self, name, path, address, version=None):
        self.name, self.path, self.address, self.version = name, path, address, version

    @property
    def available(self):
        return self.name != "none"

    def describe(self):
        if not self.available:
            return "none (numba_bf16.reference_gemm's plain loops stand in)"
        return f"{self.name} {self.version} cblas_gemm_bf16bf16f32" if self.version else self.name


def find_bf16_gemm():
    """MKL's cblas_gemm_bf16bf16f32_64 when the mkl package is installed, whichever BLAS runs the
    float32 products: NumPy's OpenBLAS has no bfloat16 GEMM (sbgemm is left out of its build)."""
    path = _mkl_path()
    if path is not None:
        dll, version = _open_mkl(path)
        address = _symbol(dll, ["cblas_gemm_bf16bf16f32_64"])
        if address:
            return Bf16Gemm("mkl", path, address, version)
    from fastnet.backends.numba_bf16 import reference_gemm
    return Bf16Gemm("none", None, reference_gemm.address)
