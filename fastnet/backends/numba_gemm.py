"""The Numba backend's GEMM driver: every matrix product of a step, cut into tiles by its shape, each
tile one single-threaded BLAS call, claimed by whichever thread is free.

Why not BLAS's own threads: a training step's products have 64 to 128 rows, and BLAS's own split of
such a product wastes part of the second core: two one-thread halves of 128x3072 @ 3072x512 ran
faster than OpenBLAS's two threads on every CPU measured (benchmarks/RESULTS.md). So BLAS is held
to one thread, and each kernel runs
`prange(thread_count())` workers that take tiles from a counter (`next_tile`) until none is left;
a forward tile is its BLAS call plus its epilogue (bias, activation), done by the thread that
computed it while it is still in cache. The backward's mask and bias-gradient sums are a pass of
their own over column tiles of dout, ahead of the products.

Why more tiles than threads, claimed as threads come free: on a machine shared with other work,
one core is often slower than the other, and a fixed one-tile-per-thread split waits for it at the
end of every product. How finely each product is cut is the plan's (`plan()`), by the shape's work.

Determinism: a tile's bounds depend only on the shape and the plan, never on the thread count; a
tile's result does not depend on which thread runs it or when; nothing is summed across tiles. So
--threads 1, 2 or 3 give the same bits. Only one pool ever runs: BLAS has one thread.

BLAS is called through its 64-bit-integer (ILP64) CBLAS interface, found at import (see
numba_blas.find_blas) and bound to a symbol name of our own, so that compiled kernels name the
symbol, not an address, and Numba's disk cache stays valid from one process to the next. Every
process binds the same signature, whichever library it finds. The plan is reached the same way.
"""

import ctypes
import os

import llvmlite.binding
import llvmlite.ir
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

from fastnet.backends import numba_plan
from fastnet.backends.numba_bf16 import CBLAS_GEMM
from fastnet.backends.numba_blas import NO_TRANS, ROW_MAJOR, TRANS, find_bf16_gemm, find_blas
from fastnet.errors import VariableError

ALIGN_COLUMNS = 16  # tile edges across a row fall on 64-byte lines: no two cores write one line
ALIGN_ROWS = 4
MIN_WIDTH_PER_ROW = 4  # a column tile is at least rows / MIN_WIDTH_PER_ROW wide (packed_once_enough)

MEASURED = numba_plan.load()  # this machine's plan (fastnet plan --measure), or None
BLAS = find_blas(os.environ.get("FASTNET_BLAS") or (MEASURED and MEASURED["blas"]))
llvmlite.binding.add_symbol("fastnet_cblas_sgemm", BLAS.sgemm)
llvmlite.binding.add_symbol("fastnet_cblas_dgemm", BLAS.dgemm)
_sgemm = types.ExternalFunction("fastnet_cblas_sgemm", CBLAS_GEMM)
_gemm_bf16 = types.ExternalFunction("fastnet_cblas_gemm_bf16", CBLAS_GEMM)
# cblas_dgemm's is the same but for alpha and beta, which are float64.
_dgemm = types.ExternalFunction("fastnet_cblas_dgemm", types.void(*[
    types.float64 if argument == types.float32 else argument for argument in CBLAS_GEMM.args]))
# How long a thread with no tile left spins before it sleeps. GNU OpenMP's default (300,000 turns)
# keeps both cores busy between kernels, which costs nothing on a quiet machine, but beside a busy
# process the spinning thread takes the core the other process needs, and each loop's end then waits
# for a thread the kernel's scheduler has put aside. 1,000 turns measured more than twice as fast
# there, and no slower quiet (benchmarks/RESULTS.md).
# Read once, when OpenMP starts (Numba's first parallel loop, just below); a user's setting stands.
SPIN_TURNS = "1000"
_USERS_WAIT = {name: os.environ[name] for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if name in os.environ}
if not _USERS_WAIT:
    os.environ["GOMP_SPINCOUNT"] = SPIN_TURNS

# numba.get_num_threads() in a kernel reaches the threading layer through a ctypes pointer, which
# keeps the kernel out of the disk cache; the layer's own C symbol, registered once it has started,
# does not.
numba.get_num_threads()
if not _USERS_WAIT:
    del os.environ["GOMP_SPINCOUNT"]  # read by now; other programs this process starts keep their own default
_get_num_threads = types.ExternalFunction("get_num_threads", types.int32())

# Found once the threading layer runs, which decides whether oneDNN's TBB may be held to one thread.
BF16_GEMM = find_bf16_gemm(preferred=MEASURED and MEASURED.get("bf16_gemm"), hold_tbb=numba.threading_layer() != "tbb")
llvmlite.binding.add_symbol("fastnet_cblas_gemm_bf16", BF16_GEMM.address)


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
    return {"threads": threads(), "split": "numba_gemm: tiles by shape, claimed by whichever thread is free, "
                                           "BLAS on one thread per tile",
            "blas": BLAS.describe(), "blas_path": BLAS.path, "bf16_gemm": BF16_GEMM.describe(),
            "threading_layer": _threading_layer(), "plan": plan(), "plan_source": plan_source(), "wait": wait_policy(),
            "same_bits_on_any_thread_count": True,
            "partition": PARTITION}


def plan_source():
    """Where the plan in force comes from: measured on this machine, the defaults, or $FASTNET_PLAN and
    $FASTNET_BLAS over either."""
    overrides = [f"{name}={os.environ[name]}" for name in ("FASTNET_BLAS", "FASTNET_PLAN") if os.environ.get(name)]
    return numba_plan.status() + (f", overridden by {' and '.join(overrides)}" if overrides else "")


def wait_policy():
    """How idle threads wait, as OpenMP was told at start: the user's OMP_WAIT_POLICY and GOMP_SPINCOUNT,
    or fastnet's spin count."""
    if not _USERS_WAIT:
        return f"GOMP_SPINCOUNT={SPIN_TURNS} (fastnet's default)"
    return ", ".join(f"{name}={value} (set by the user)" for name, value in _USERS_WAIT.items())


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return numba.config.THREADING_LAYER


PARTITION = {
    "forward x @ W": "tiles of output columns, in multiples of 16 (rows for an output narrower than 32 columns "
                     "and than the batch), one per plan's tile_flops (bf16_tile_flops for bf16 operands), a "
                     "multiple of tile_multiple, each at least a quarter as wide as the batch is tall",
    "weight gradient x.T @ dout": "tiles of dW's rows, as many as tile_flops (bf16_tile_flops) and tile_multiple "
                                  "make",
    "input gradient dout @ W.T": "tiles as the forward's, claimed after dW's from the same counter",
    "bias gradient": "column tiles, one per plan's pass_elements, each column summed over the batch in order",
    "elementwise passes and optimizer updates": "rows, or equal runs of the flat array, one run per thread",
}


# --- Tiles claimed by whichever thread is free ---------------------------------------------------------
# A kernel cuts its work into tiles by the shape alone, then runs `prange(thread_count())` workers that
# each take the next unclaimed tile from a counter until none is left: a thread whose core another
# process is using takes fewer tiles instead of holding the others up at the end of the loop. Which
# thread runs a tile never changes its result, so the bits depend on the shapes alone.

@intrinsic
def tile_counter(typingctx):
    """A counter of claimed tiles, starting at 0, on the calling kernel's stack: nothing is allocated,
    and each call of a kernel (from any Python thread) has its own."""
    def codegen(context, builder, signature, args):
        counter = cgutils.alloca_once(builder, context.get_value_type(types.int64))
        builder.store(context.get_constant(types.int64, 0), counter)
        return counter
    return types.CPointer(types.int64)(), codegen


@intrinsic
def _claim(typingctx, counter):
    """The counter's value before adding 1 to it, atomically: no two threads get the same number."""
    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", args[0], context.get_constant(types.int64, 1), "monotonic")
    return types.int64(counter), codegen


@njit(cache=True, nogil=True)
def next_tile(counter, tiles):
    """The next tile for the calling thread to compute, or -1 when all `tiles` are taken."""
    tile = _claim(counter)
    return tile if tile < tiles else -1


# --- The plan: how finely work is cut, read by compiled kernels at every call ---------------------------
# The values live in a C array that compiled code reaches by a symbol name of our own, as it reaches
# BLAS: the disk cache stays valid, and a plan measured on this machine takes effect without compiling.

PLAN_ENTRIES = ("tile_flops", "tile_multiple", "pass_elements", "bf16_tile_flops")
# On the Emerald Rapids machine (2 cores, MKL), R1 ran fastest at 32 MFLOP tiles (12 for its first layer's
# products, 2 for the others), quiet and beside a busy process, among 16, 32, 64 and 1024. Its bf16
# products run about 2.4 times as fast, and a call's fixed cost (packing the operands into AMX's
# layout) weighs more: its R1 bf16 step took 2.1-2.4 ms with a tile per core, 2.6-3.1 ms at 32 MFLOP.
DEFAULT_PLAN = {"tile_flops": 1 << 25, "tile_multiple": os.cpu_count() or 1, "pass_elements": 1 << 15,
                "bf16_tile_flops": 1 << 40}
_first = DEFAULT_PLAN | (MEASURED["entries"] if MEASURED else {})
_plan = (ctypes.c_int64 * len(PLAN_ENTRIES))(*(_first[name] for name in PLAN_ENTRIES))
llvmlite.binding.add_symbol("fastnet_tile_plan", ctypes.addressof(_plan))
TILE_FLOPS, TILE_MULTIPLE, PASS_ELEMENTS, BF16_TILE_FLOPS = range(len(PLAN_ENTRIES))


def set_plan(**values):
    """Set plan entries (positive integers) for every later kernel call of this process."""
    for name, value in values.items():
        if name not in PLAN_ENTRIES or not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"{name}={value!r} is not a plan entry: entries are {', '.join(PLAN_ENTRIES)}, each a "
                             f"whole number >= 1")
        _plan[PLAN_ENTRIES.index(name)] = int(value)


def plan():
    return {name: _plan[i] for i, name in enumerate(PLAN_ENTRIES)}


if os.environ.get("FASTNET_PLAN"):  # e.g. tile_flops=33554432,pass_elements=65536
    try:
        set_plan(**dict(item.partition("=")[::2] for item in os.environ["FASTNET_PLAN"].split(",")))
    except ValueError as exc:
        raise VariableError(f"FASTNET_PLAN={os.environ['FASTNET_PLAN']!r}: {exc}; write it as "
                            f"{','.join(name + '=N' for name in PLAN_ENTRIES)}, or unset it") from None


@intrinsic
def plan_entry(typingctx, index):
    """Entry `index` of the plan, as it is when the kernel runs."""
    def codegen(context, builder, signature, args):
        table = builder.module.globals.get("fastnet_tile_plan")
        if table is None:
            table = llvmlite.ir.GlobalVariable(builder.module, llvmlite.ir.ArrayType(llvmlite.ir.IntType(64),
                                                                                      len(PLAN_ENTRIES)),
                                               "fastnet_tile_plan")
            table.linkage = "external"
        return builder.load(builder.gep(table, [context.get_constant(types.int64, 0), args[0]]))
    return types.int64(index), codegen


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
def split_columns(rows, columns):
    """Whether a product with an output of rows x columns is split by columns (else by rows): by the
    wider side, so each tile packs the operand it shares with the others (x, or dout) once more."""
    return columns >= rows or columns >= 2 * ALIGN_COLUMNS


@njit(cache=True, nogil=True)
def tiles_along(work, grain, length, align):
    """How many tiles `work` is cut into along an axis of `length`: a multiple of the plan's
    tile_multiple (the machine's cores: equal tiles then share out evenly) of about `grain` each, and
    no more than the axis has blocks of `align`."""
    multiple = plan_entry(TILE_MULTIPLE)
    tiles = max(1, (work + grain * multiple - 1) // (grain * multiple)) * multiple
    return max(1, min(tiles, (length + align - 1) // align))


@njit(cache=True, nogil=True)
def tile_grain(itemsize):
    """The plan's FLOPs a tile for operands of `itemsize` bytes: bfloat16's (2) or float32's and float64's."""
    return plan_entry(BF16_TILE_FLOPS if itemsize == 2 else TILE_FLOPS)


@njit(cache=True, nogil=True)
def product_tiles(rows, columns, depth, itemsize):
    """How many tiles (product_tile) a product with a rows x columns output, summed over `depth`, of
    operands of `itemsize` bytes, is cut into: about one per plan's tile_flops (bf16_tile_flops)."""
    work = 2 * rows * columns * depth
    if split_columns(rows, columns):
        return min(tiles_along(work, tile_grain(itemsize), columns, ALIGN_COLUMNS), packed_once_enough(rows, columns))
    return tiles_along(work, tile_grain(itemsize), rows, ALIGN_ROWS)


@njit(cache=True, nogil=True)
def packed_once_enough(rows, columns):
    """The most column tiles of a rows x columns output whose tiles are each at least rows / 4 wide
    (a multiple of tile_multiple where that leaves one or more per core). Every column tile packs all
    of x's rows again: for a training batch of 256 rows or fewer the tile_flops grain keeps tiles wider
    than that anyway, but evaluation's chunks of 1,000 rows would be cut into tiles of 16 columns that
    spend more time packing 8 MB of x than multiplying it (a third of the speed, measured)."""
    tiles = max(1, MIN_WIDTH_PER_ROW * columns // rows)
    multiple = plan_entry(TILE_MULTIPLE)
    return tiles - tiles % multiple if tiles >= multiple else tiles


@njit(cache=True, nogil=True)
def weight_gradient_tiles(fan_in, fan_out, batch, itemsize):
    """How many row tiles dW = x.T @ dout (fan_in x fan_out) is cut into."""
    return tiles_along(2 * fan_in * fan_out * batch, tile_grain(itemsize), fan_in, ALIGN_COLUMNS)


@njit(cache=True, nogil=True)
def column_tiles(rows, columns):
    """How many column tiles a pass over a rows x columns array is cut into: about one per plan's
    pass_elements."""
    return tiles_along(rows * columns, plan_entry(PASS_ELEMENTS), columns, ALIGN_COLUMNS)


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


# --- Whole products, split across the threads -----------------------------------------------------------

@njit(cache=True, nogil=True)
def product_tile(rows, columns, parts, part):
    """(row start, row stop, column start, column stop) of tile `part` of `parts` of a rows x columns
    output."""
    if split_columns(rows, columns):
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
    matmul_tiles(a, b, work)
    if work is not out:
        out[...] = work


@njit(cache=True, nogil=True, parallel=True)
def matmul_tiles(a, b, out):
    rows, columns = out.shape
    tiles, counter = product_tiles(rows, columns, a.shape[1], a.itemsize), tile_counter()
    for _ in numba.prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            r0, r1, c0, c1 = product_tile(rows, columns, tiles, tile)
            gemm(a[r0:r1], b[:, c0:c1], out[r0:r1, c0:c1])
            tile = next_tile(counter, tiles)
