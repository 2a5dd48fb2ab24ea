"""The BLAS that the Numba backend's GEMM driver (numba_gemm.py) calls, and CBLAS's enum values that
every call passes: which library is found at import (MKL or OpenBLAS, through its 64-bit-integer
CBLAS interface), and which multiplies bfloat16 operands.

Finding them needs no Numba (but for the bf16 GEMM: numba_bf16.reference_gemm stands in where
neither MKL nor oneDNN is installed, and numba_onednn adapts oneDNN's): numba_plan asks which
libraries are installed without starting the driver.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

import llvmlite.binding
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
    """The library of the bfloat16 GEMM (bf16 operands, float32 products and output): its name, file,
    version and the bf16 instructions it multiplies with (empty: it converts the operands to float32
    first, no faster than float32), or 'none' when only numba_bf16.reference_gemm's loops stand in.
    `address` is a C function with cblas_gemm_bf16bf16f32's ILP64 signature (numba_bf16.CBLAS_GEMM)."""

    def __init__(self, name, path, address, version=None, instructions=()):
        self.name, self.path, self.address, self.version = name, path, address, version
        self.instructions = list(instructions)

    @property
    def available(self):
        return self.name != "none"

    def describe(self):
        if not self.available:
            return "none (numba_bf16.reference_gemm's plain loops stand in)"
        routine = {"mkl": "cblas_gemm_bf16bf16f32", "onednn": "dnnl_gemm_bf16bf16f32"}[self.name]
        uses = " and ".join(self.instructions) or "no bf16 instructions: it converts to float32"
        return f"{self.name} {self.version} {routine} ({uses})"


BF16_GEMMS = ("mkl", "onednn")


def find_bf16_gemm(choice=None, preferred=None, hold_tbb=True):
    """The bfloat16 GEMM: `choice` or $FASTNET_BF16_GEMM ('mkl' or 'onednn') when set; else the first
    installed of `preferred` (the measured plan's), MKL on Intel CPUs, oneDNN, and MKL on any CPU.
    MKL's takes AMX and AVX512-BF16 on Intel's CPUs only: on an AMD Zen 4 it dispatched to its
    generic path, which converts to float32 (0.77x float32's speed), where oneDNN, which dispatches by
    instruction flags, uses the CPU's AVX512-BF16. NumPy's OpenBLAS has no bfloat16 GEMM (sbgemm is
    left out of its build). With neither installed, numba_bf16.reference_gemm's loops stand in.
    `hold_tbb`: False where Numba's own threads are TBB's, whose limit would serialise the driver too;
    oneDNN's calls then run nested in Numba's tasks, which TBB schedules without more threads."""
    choice = choice or os.environ.get("FASTNET_BF16_GEMM")
    if choice not in (None, *BF16_GEMMS):
        raise VariableError(f"FASTNET_BF16_GEMM={choice!r} is not a bfloat16 GEMM fastnet can call: set it to "
                            f"{' or '.join(BF16_GEMMS)}, or unset it")
    intel = cpu.vendor() == "GenuineIntel"
    order = [choice] if choice else [*([preferred] if preferred else []), *(["mkl", "onednn"] if intel
                                                                          else ["onednn", "mkl"])]
    for name in order:
        found = _mkl_bf16_gemm() if name == "mkl" else _onednn_bf16_gemm(hold_tbb)
        if found is not None:
            return found
    if choice:
        raise VariableError(f"FASTNET_BF16_GEMM={choice} but {choice} is not installed: "
                            f"pip install 'fastnet[{choice}]', or unset FASTNET_BF16_GEMM")
    from fastnet.backends.numba_bf16 import reference_gemm
    return Bf16Gemm("none", None, reference_gemm.address)


class _MklVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                ("status", ctypes.c_char_p), ("build", ctypes.c_char_p), ("processor", ctypes.c_char_p),
                ("platform", ctypes.c_char_p)]


def _mkl_bf16_gemm():
    path = _mkl_path()
    if path is None:
        return None
    dll, version = _open_mkl(path)
    address = _symbol(dll, ["cblas_gemm_bf16bf16f32_64"])
    if not address:
        return None
    described = _MklVersion()
    dll.MKL_Get_Version(ctypes.byref(described))
    return Bf16Gemm("mkl", path, address, version,
                    mkl_bf16_instructions((described.processor or b"").decode(errors="replace")))


def mkl_bf16_instructions(processor):
    """The bf16 instructions of the code path MKL says it dispatched to (MKLVersion.Processor, e.g.
    "Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16
    (limited) instructions, and Intel(R) Advanced Matrix Extensions (Intel(R) AMX) with INT8 and BF16"
    on an Emerald Rapids): on a CPU not Intel's, none, whatever the CPU has."""
    vectors, _, matrices = processor.partition("Matrix Extensions")
    return [name for name, said in (("AMX-BF16", "BF16" in matrices), ("AVX512-BF16", "BF16" in vectors)) if said]


def onednn_bf16_instructions(isa):
    """The bf16 instructions of oneDNN's effective ISA (dnnl_get_effective_cpu_isa's dnnl_cpu_isa_t)."""
    return [name for name, bits in ONEDNN_ISA_BF16 if isa & bits == bits]


# oneDNN's PyPI build links the Intel compiler's runtime, TBB and SYCL, installed beside it into the
# environment's lib/ folder, where the dynamic loader does not look: they are loaded first, in the order
# of their own dependencies, so that libdnnl finds them loaded.
ONEDNN_RUNTIME = ("libintlc.so.5", "libimf.so", "libsvml.so", "libirng.so", "libtbb.so.12", "libumf.so.1",
                  "libur_loader.so.0", "libsycl.so.9")
# dnnl_cpu_isa_t's bits (dnnl_types.h): each ISA's value holds every bit of the ones it extends.
ONEDNN_ISA_BF16 = (("AMX-BF16", 0xFEF), ("AVX512-BF16", 0xE7))
_held = []  # what must live as long as the process: oneDNN's libraries, TBB's thread limit
ONEDNN_SYMBOL = "fastnet_dnnl_gemm_bf16"


def _onednn_path():
    for prefix in (sys.prefix, sys.base_prefix):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libdnnl.so.*")))
        if found:
            return found[0]
    return ctypes.util.find_library("dnnl")


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int), ("hash", ctypes.c_char_p),
                ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class _TbbGlobalControl(ctypes.Structure):
    """oneTBB's tbb::global_control object (value, a reserved word, the parameter), as its ABI lays it out."""
    _fields_ = [("value", ctypes.c_size_t), ("reserved", ctypes.c_size_t), ("parameter", ctypes.c_int)]


TBB_MAX_ALLOWED_PARALLELISM = 0


def _onednn_bf16_gemm(hold_tbb=True):
    path = _onednn_path()
    if path is None:
        return None
    folder = os.path.dirname(path)
    try:
        for name in ONEDNN_RUNTIME:
            if os.path.exists(os.path.join(folder, name)):
                _held.append(ctypes.CDLL(os.path.join(folder, name), mode=ctypes.RTLD_GLOBAL))
        dll = ctypes.CDLL(path)
    except OSError:  # a runtime library missing: oneDNN cannot load, as if it were not installed
        return None
    if hold_tbb:
        _hold_tbb_to_one_thread(folder)
    dll.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
    number = dll.dnnl_version().contents
    instructions = onednn_bf16_instructions(dll.dnnl_get_effective_cpu_isa())
    _held.append(dll)
    llvmlite.binding.add_symbol(ONEDNN_SYMBOL, _symbol(dll, ["dnnl_gemm_bf16bf16f32"]))
    from fastnet.backends.numba_onednn import cblas_gemm_bf16  # compiled (or loaded) against that symbol

    return Bf16Gemm("onednn", path, cblas_gemm_bf16.address, f"{number.major}.{number.minor}.{number.patch}",
                    instructions)


def _hold_tbb_to_one_thread(folder):
    """oneDNN's calls run on TBB's threads, and it has no per-call thread count: the GEMM driver calls it
    once per tile on each of its own threads, as it calls MKL's sequential layer, so TBB is held to the
    calling thread, as tbb::global_control(max_allowed_parallelism, 1) would hold it in C++. Its own
    two threads would otherwise join every call of both of the driver's, four threads on two cores."""
    tbb = ctypes.CDLL(os.path.join(folder, "libtbb.so.12"))
    control = _TbbGlobalControl(1, 0, TBB_MAX_ALLOWED_PARALLELISM)
    tbb._ZN3tbb6detail2r16createERNS0_2d114global_controlE(ctypes.byref(control))  # tbb::detail::r1::create
    _held.append(control)
