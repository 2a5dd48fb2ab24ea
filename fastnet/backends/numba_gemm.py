"""The Numba backend's GEMM driver: every matrix product of a step, split into one tile per thread,
each tile one single-threaded BLAS call on a core of its own.

Why not BLAS's own threads: a training step's products have 64 to 128 rows, and BLAS's own split of
such a product wastes part of the second core. On an Intel Xeon (Sapphire Rapids), OpenBLAS ran
128x3072 @ 3072x512 at 191 GFLOP/s on two threads and at 239 as two one-thread halves; on an AMD
EPYC (Zen 3), at 125 and 131. So BLAS is held to one thread, and each kernel runs a
`prange(thread_count())` loop whose body is one tile's BLAS call plus its epilogue (bias,
activation, mask, bias-gradient sums), done by the same thread while the tile is still in cache.

Determinism: a tile's bounds depend only on the shape and the number of tiles, thread_count() at
the call; a tile's result does not depend on which thread runs it or when. Only one pool ever
runs: BLAS has one thread.

BLAS is called through its 64-bit-integer (ILP64) CBLAS interface, found at import (see `find_blas`)
and bound to a symbol name of our own, so that compiled kernels name the symbol, not an address, and
Numba's disk cache stays valid from one process to the next. Every process binds the same
signature, whichever library it finds.
"""

import ctypes
import ctypes.util
import functools
import glob
import inspect
import os
import sys

import llvmlite.binding
import numba
import numpy as np
from numba import njit, types
from threadpoolctl import ThreadpoolController, threadpool_info

from fastnet import cpu

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS's enum values
MKL_THREADING_SEQUENTIAL = 1
ALIGN_COLUMNS = 16  # tile edges across a row fall on 64-byte lines: no two cores write one line
ALIGN_ROWS = 4


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
    (0.3.31 as of NumPy 2.4), whose one-thread sgemm ran R1's products 17-23 % faster on an AMD EPYC
    than SciPy's LP64 0.3.30, which Numba's own np.dot calls."""
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
    """The BLAS to call: $FASTNET_BLAS ('mkl' or 'openblas') when set; else MKL on Intel CPUs where
    the mkl package is installed, and OpenBLAS otherwise. On an AMD EPYC (Zen 3) MKL's one-thread
    sgemm was 8 % faster on the forward shapes and 15 % slower on the weight gradient's, so there
    OpenBLAS, which NumPy and SciPy bring anyway, stays."""
    choice = choice or os.environ.get("FASTNET_BLAS")
    if choice not in (None, "mkl", "openblas"):
        raise ValueError(f"FASTNET_BLAS={choice!r} is not a BLAS fastnet can drive: set it to mkl or openblas")
    mkl = _mkl_path() if choice in (None, "mkl") else None
    if choice == "mkl" and mkl is None:
        raise ValueError("FASTNET_BLAS=mkl but MKL is not installed: pip install mkl, or unset FASTNET_BLAS")
    if mkl and (choice == "mkl" or cpu.vendor() == "GenuineIntel"):
        dll, version = _open_mkl(mkl)
        sgemm, dgemm = _symbol(dll, ["cblas_sgemm_64"]), _symbol(dll, ["cblas_dgemm_64"])
        if sgemm and dgemm:
            return Blas("mkl", mkl, sgemm, dgemm, version=version)
        if choice == "mkl":
            raise ValueError(f"FASTNET_BLAS=mkl but {mkl} has no ILP64 interface (cblas_sgemm_64): pip install -U mkl")
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


BLAS = find_blas()
BF16_GEMM = find_bf16_gemm()
llvmlite.binding.add_symbol("fastnet_cblas_sgemm", BLAS.sgemm)
llvmlite.binding.add_symbol("fastnet_cblas_dgemm", BLAS.dgemm)
llvmlite.binding.add_symbol("fastnet_cblas_gemm_bf16", BF16_GEMM.address)
_enum, _int, _ptr = types.int32, types.int64, types.voidptr  # CBLAS's enums stay C ints
_sgemm = types.ExternalFunction("fastnet_cblas_sgemm", types.void(
    _enum, _enum, _enum, _int, _int, _int, types.float32, _ptr, _int, _ptr, _int, types.float32, _ptr, _int))
_dgemm = types.ExternalFunction("fastnet_cblas_dgemm", types.void(
    _enum, _enum, _enum, _int, _int, _int, types.float64, _ptr, _int, _ptr, _int, types.float64, _ptr, _int))
_gemm_bf16 = types.ExternalFunction("fastnet_cblas_gemm_bf16", types.void(
    _enum, _enum, _enum, _int, _int, _int, types.float32, _ptr, _int, _ptr, _int, types.float32, _ptr, _int))
# numba.get_num_threads() in a kernel reaches the threading layer through a ctypes pointer, which
# keeps the kernel out of the disk cache; the layer's own C symbol, registered once it has started,
# does not.
numba.get_num_threads()
_get_num_threads = types.ExternalFunction("get_num_threads", types.int32())


@njit(cache=True, nogil=True)
def thread_count():
    """The number of threads the calling thread's parallel loops use: the tile count."""
    return _get_num_threads()


def hold_blas_to_one_thread():
    """Limit every loaded BLAS to one thread, for the rest of the process: the driver's, and SciPy's,
    which Numba's np.dot calls (sum_of_squares). The backend calls it at import; the numpy backend's
    use_threads raises the limit only while it runs."""
    import scipy.linalg.cython_blas  # noqa: F401  (loaded now, so that the limit reaches it)
    ThreadpoolController().select(user_api="blas").limit(limits=1)


MAX_THREADS = numba.config.NUMBA_NUM_THREADS


def use_threads(threads):
    """Run the backend's kernels on `threads` threads (cores): its tile count."""
    numba.set_num_threads(int(threads))


def threads():
    return numba.get_num_threads()


def describe():
    """What config.json records of the driver: its BLAS, the threads and how each product is split."""
    return {"threads": threads(), "split": "numba_gemm: one tile per thread, BLAS on one thread per tile",
            "blas": BLAS.describe(), "blas_path": BLAS.path, "bf16_gemm": BF16_GEMM.describe(),
            "threading_layer": _threading_layer(),
            "partition": PARTITION}


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return numba.config.THREADING_LAYER


PARTITION = {
    "forward x @ W": "columns of the output, in multiples of 16 (rows when it has fewer than 16 per thread)",
    "weight gradient x.T @ dout": "rows of dW",
    "input gradient dout @ W.T": "rows of dx (the batch)",
    "bias gradient": "columns, each summed over the batch in order",
    "elementwise passes and optimizer updates": "rows, or equal runs of the flat array",
}


# --- The partition -----------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def span(length, parts, part, align):
    """The part-th of `parts` contiguous runs that cover range(length): as equal as `align` allows,
    every inner edge a multiple of `align`. With more parts than aligned blocks, some runs are empty."""
    blocks = (length + align - 1) // align
    start = min(blocks * part // parts * align, length)
    stop = min(blocks * (part + 1) // parts * align, length)
    return start, stop


@njit(cache=True, nogil=True)
def split_columns(rows, columns, parts):
    """Whether a product with an output of rows x columns is split by columns (else by rows)."""
    return columns >= ALIGN_COLUMNS * parts or columns >= rows


# --- One tile: one BLAS call ---------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _layout(a, itemsize):
    """(CBLAS transpose flag, leading dimension) of a matrix with a unit stride along one axis;
    (0, 0) when it has none."""
    rows, cols = a.shape
    if a.strides[1] == itemsize or cols == 1:
        lead = a.strides[0] // itemsize if rows > 1 else cols
        return NO_TRANS, max(lead, cols, 1)
    if a.strides[0] == itemsize or rows == 1:
        lead = a.strides[1] // itemsize if cols > 1 else rows
        return TRANS, max(lead, rows, 1)
    return 0, 0


@njit(cache=True, nogil=True)
def gemm(a, b, out):
    """out = a @ b as one BLAS call on the calling thread. a and b need a unit stride along one axis
    (row-major arrays and their transposes); out along its rows. Nothing is allocated. a and b may
    both be bfloat16 (uint16 arrays) with a float32 out: the products are then the bf16 GEMM's."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        out[:, :] = 0
        return
    trans_a, lead_a = _layout(a, a.itemsize)
    trans_b, lead_b = _layout(b, b.itemsize)
    lead_out = max(out.strides[0] // out.itemsize if m > 1 else n, n, 1)
    if a.itemsize == 2:
        _gemm_bf16(ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1), a.ctypes, lead_a, b.ctypes, lead_b,
                   np.float32(0), out.ctypes, lead_out)
    elif out.itemsize == 4:
        _sgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1), a.ctypes, lead_a, b.ctypes, lead_b,
               np.float32(0), out.ctypes, lead_out)
    else:
        _dgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.ctypes, lead_a, b.ctypes, lead_b, 0.0, out.ctypes,
               lead_out)


def on_contiguous(*written):
    """Compile a kernel for C-contiguous arrays alone; `written` names the arguments it writes.

    Numba compiles a function once per combination of its arguments' layouts (C, Fortran, strided),
    and the equivalence suite passes all three: a seven-array backward kernel compiled 36 times, and
    the first test run spent most of its time compiling. The entry this returns hands the compiled
    kernel its arguments as they are when every array is C-contiguous, as the model's and the
    optimizer's always are; otherwise it passes C-contiguous copies and writes the written ones back.
    """
    def decorate(kernel):
        signature = inspect.signature(kernel.py_func)
        positions = [list(signature.parameters).index(name) for name in written]

        @functools.wraps(kernel.py_func)
        def entry(*args, **kwargs):
            if kwargs:
                args = signature.bind(*args, **kwargs).args
            for a in args:  # a loop, not all(...): this runs before every kernel call of every step
                if isinstance(a, np.ndarray) and not a.flags["C_CONTIGUOUS"]:
                    break
            else:
                return kernel(*args)
            work = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in args]
            result = kernel(*work)
            for i in positions:
                if i < len(args) and work[i] is not args[i]:
                    args[i][...] = work[i]
            return result

        entry.compiled = kernel  # the Numba dispatcher, for what inspects its compilations
        return entry
    return decorate


# --- Whole products, split across the threads -----------------------------------------------------------

@njit(cache=True, nogil=True)
def product_tile(rows, columns, parts, part):
    """(row start, row stop, column start, column stop) of tile `part` of a rows x columns output."""
    if split_columns(rows, columns, parts):
        start, stop = span(columns, parts, part, ALIGN_COLUMNS)
        return 0, rows, start, stop
    start, stop = span(rows, parts, part, ALIGN_ROWS)
    return start, stop, 0, columns


def matmul(a, b, out):
    """out = a @ b, one tile per thread: the driver's plain product, which the dense kernels repeat
    with their epilogues. a and b may be transposed views (BLAS reads them as they are); another
    layout is copied first. out is written in place whatever its layout."""
    a, b = (m if m.flags.c_contiguous or m.flags.f_contiguous else np.ascontiguousarray(m) for m in (a, b))
    work = np.ascontiguousarray(out)
    _matmul_tiles(a, b, work)
    if work is not out:
        out[...] = work


@njit(cache=True, nogil=True, parallel=True)
def _matmul_tiles(a, b, out):
    parts = thread_count()
    for part in numba.prange(parts):
        r0, r1, c0, c1 = product_tile(out.shape[0], out.shape[1], parts, part)
        gemm(a[r0:r1], b[:, c0:c1], out[r0:r1, c0:c1])
