"""The Numba backend: the reference kernels of numpy_backend.py as JIT-compiled loops, name for name.

What it does that NumPy cannot:
- fuses the passes NumPy makes one at a time: the bias and ReLU run as the epilogue of the forward
  GEMM, the ReLU mask and the bias-gradient column sums share one pass in backward, and each
  optimizer step is one loop over the parameter;
- writes every result into the caller's arrays, so a training step allocates nothing;
- keeps float32 arithmetic in float32: a Python float in Numba code is a float64, so scalars are
  first converted with `array.dtype.type(...)`, which also keeps float64 models in float64;
- divides as NumPy does (`error_model="numpy"`: inf or nan, no ZeroDivisionError). Numba's default
  checks every division for zero, and that branch kept the Adam loop from vectorising: 7x slower.

The products go through the GEMM driver of numba_gemm.py: BLAS held to one thread, each product
cut into tiles by its shape and the plan, claimed by whichever thread is free, each forward tile's
bias and activation done by the thread that computed the tile. Every dense kernel is one of two tile
loops (_dense_forward_tiles, _dense_backward_columns) with its activation chosen at compile time, and
every optimizer update is one (_update_tiles) with its rule chosen so. The other memory-bound loops
(gathering the batch, the elementwise passes) split their rows across the same threads with `prange`.
Nothing is summed across tiles: every sum is done by one thread in a fixed order, so results
depend on neither thread timing nor the thread count. The losses and count_correct stay serial: a 128 x 10 batch is less
work than waking a thread. Compiled code is cached on disk (`cache=True`), so a second process
starts warm. Every kernel is compiled for C-contiguous arrays alone (numba_contiguous.on_contiguous), which
is what the model and optimizer pass: an array of another layout is copied on the way in, and out.
Every kernel releases the GIL (`nogil=True`): a data-parallel rank's reducing thread
(distributed.py, --overlap) sends gradients while the main thread computes.

Every kernel keeps numpy_backend's return convention (arrays into the caller's outputs, None
returned; a number only where the result is one). The private helpers have one naming pattern. A
part of one kernel that Numba needs as a function of its own is `_<kernel>_<part>`: `_tiles`, a
parallel loop over a product's tiles; `_columns`, a backward kernel's parallel pass over column
tiles of dout before its products; `_row`, one row's work. A helper that several kernels share is named for what it
computes (`_weight_and_input_grads`, `_gelu`, `_row_max`), and one that numpy_backend has too keeps
the reference's name and arguments (`_adam`). The constants that define a result (GELU's,
SplitMix64's, bfloat16's bit patterns) are imported from numpy_backend. Numba compiles a global in as
a constant, and its disk cache checks only the source file of the function it caches, so after
changing one of them there, delete the cached .nbi and .nbc files.
"""

import contextlib
import math
import os

if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
    # Numba caches next to the source by default; an installed, read-only package needs elsewhere.
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastnet", "numba")

import numpy as np
from numba import literally, njit, prange, types
from numba.extending import overload

from fastnet.backends import numba_gemm
from fastnet.backends.numba_bf16 import bits_float32, from_bf16, to_bf16
from fastnet.backends.numba_contiguous import on_contiguous
from fastnet.backends.numba_gemm import (
    ALIGN_COLUMNS,
    column_tiles,
    gemm,
    matmul_tiles,
    next_tile,
    product_tile,
    product_tiles,
    span,
    thread_count,
    tile_counter,
    weight_gradient_tiles,
)
from fastnet.backends.numpy_backend import (
    GELU_CUBIC,
    GELU_SQRT_2_OVER_PI,
    SPLITMIX_GAMMA,
    SPLITMIX_MULTIPLIERS,
    SPLITMIX_SHIFTS,
)
from fastnet.errors import FastnetError

numba_gemm.hold_blas_to_one_thread()


@contextlib.contextmanager
def use_threads(threads):
    """A context in which the kernels split their work into `threads` tiles on as many threads
    (None: one per core, Numba's default)."""
    before = numba_gemm.threads()
    if threads is not None:
        if threads > numba_gemm.MAX_THREADS:
            raise FastnetError(f"--threads {threads} is more than the {numba_gemm.MAX_THREADS} threads Numba "
                               f"started with: pass at most {numba_gemm.MAX_THREADS}, or set "
                               f"NUMBA_NUM_THREADS={threads}")
        numba_gemm.use_threads(threads)
    try:
        yield
    finally:
        numba_gemm.use_threads(before)


def parallelism():
    return numba_gemm.describe()


def bf16_gemm():
    """The library of the bfloat16 products (MKL's), or None when only plain loops stand in."""
    return numba_gemm.BF16_GEMM.describe() if numba_gemm.BF16_GEMM.available else None

NAME = "numba"


# --- Data ------------------------------------------------------------------------------------------


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def gather_normalize(images, indices, shift, scale, out, out16=None):
    """out[i] = (images[indices[i]] - shift) * scale, converting each row as it is copied (and
    rounding it into out16 in the same pass)."""
    to_float = out.dtype.type
    for i in prange(indices.shape[0]):
        row = images[indices[i]]
        for j in range(out.shape[1]):
            y = (to_float(row[j]) - shift[j]) * scale[j]
            out[i, j] = y
            if out16 is not None:
                out16[i, j] = to_bf16(y)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def gather_flip_components(inputs, indices, flips, signs, out, out16=None):
    """out[i] = inputs[indices[i]], times signs where flips[i] is set: a mirrored image, for images
    stored as mirror-symmetric and antisymmetric components."""
    for i in prange(indices.shape[0]):
        row = inputs[indices[i]]
        if flips[i] != 0:
            for j in range(out.shape[1]):
                out[i, j] = row[j] * signs[j]
        else:
            for j in range(out.shape[1]):
                out[i, j] = row[j]
        if out16 is not None:
            for j in range(out.shape[1]):
                out16[i, j] = to_bf16(out[i, j])


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def augment_gather_normalize(images, indices, flips, offsets, cutout_centres, cutout_size, shift, scale, out,
                             out16=None):
    """gather_normalize of (N, H, W, C) images with each sample's flip, translation and cutout: every
    output pixel is read from where the flip and translation put it, or written as 0 (padding and
    cutout) in the same pass."""
    to_float = out.dtype.type
    zero = to_float(0)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    for i in prange(indices.shape[0]):
        image = images[indices[i]]
        dy, dx = offsets[i, 0], offsets[i, 1]
        mirrored = flips[i] != 0
        cut_top = cutout_centres[i, 0] - cutout_size // 2
        cut_left = cutout_centres[i, 1] - cutout_size // 2
        for y in range(height):
            source_y = y - dy
            row_inside = 0 <= source_y < height
            row_cut = cut_top <= y < cut_top + cutout_size
            for x in range(width):
                source_x = x - dx
                if mirrored:
                    source_x = width - 1 - source_x
                feature = (y * width + x) * channels
                visible = row_inside and 0 <= source_x < width
                if row_cut and cut_left <= x < cut_left + cutout_size:
                    visible = False
                if visible:
                    for c in range(channels):
                        f = feature + c
                        out[i, f] = (to_float(image[source_y, source_x, c]) - shift[f]) * scale[f]
                else:
                    for c in range(channels):
                        out[i, feature + c] = zero
        if out16 is not None:
            for j in range(out.shape[1]):
                out16[i, j] = to_bf16(out[i, j])


# --- bfloat16 --------------------------------------------------------------------------------------


@on_contiguous("out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def round_to_bf16(x, out16):
    """out16 = x rounded to bfloat16, ties to even (numba_bf16.to_bf16), rows split across threads."""
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            out16[i, j] = to_bf16(x[i, j])


@on_contiguous("out")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def bf16_to_float32(x16, out):
    """out = the exact float32 values of the bfloat16 bits in x16."""
    for i in prange(x16.shape[0]):
        for j in range(x16.shape[1]):
            out[i, j] = from_bf16(x16[i, j])


# --- Activations -----------------------------------------------------------------------------------


@on_contiguous("dx")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def relu_backward(dout, out, dx):
    """dx = dout where out > 0, else 0; dx may be dout itself."""
    zero = dout.dtype.type(0)
    for i in prange(dout.shape[0]):
        for j in range(dout.shape[1]):
            dx[i, j] = dout[i, j] if out[i, j] > zero else zero


# Constants are converted to the arrays' dtype once, so float32 stays float32.


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def relu_forward(x, out, out16=None):
    """out = max(x, 0); out may be x."""
    zero = out.dtype.type(0)
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            z = max(x[i, j], zero)
            out[i, j] = z
            if out16 is not None:
                out16[i, j] = to_bf16(z)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def leaky_relu_forward(x, negative_slope, out, out16=None):
    """out = x where x > 0, else negative_slope * x; out may be x."""
    slope, zero = out.dtype.type(negative_slope), out.dtype.type(0)
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            z = x[i, j]
            y = z if z > zero else z * slope
            out[i, j] = y
            if out16 is not None:
                out16[i, j] = to_bf16(y)


@on_contiguous("dx")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def leaky_relu_backward(dout, out, negative_slope, dx):
    """dx = dout where out > 0, else negative_slope * dout; dx may be dout."""
    slope, zero = dx.dtype.type(negative_slope), dx.dtype.type(0)
    for i in prange(dout.shape[0]):
        for j in range(dout.shape[1]):
            g = dout[i, j]
            dx[i, j] = g if out[i, j] > zero else g * slope


# tanh and GELU go through exp instead of the C library's tanh: 13 ns an element against 2 to 3.
# For tanh in float32 the exp form is evaluated in float64 (np.exp, the C library's), where
# 1 - 2 / (exp(2z) + 1) has no cancellation that float32 could see; a float64 model (gradient
# checks) keeps np.tanh. GELU's tanh form is rewritten exactly as z * sigmoid(2u), u = sqrt(2/pi) *
# (z + 0.044715 z^3), whose slope s + 2 z u' s (1 - s) needs no cancelling 1 - s either: 1 - s = e s
# with e = exp(-2u). The exponent is capped so that e stays finite and e * s stays a number.

@njit(cache=True, nogil=True, error_model="numpy")
def _tanh_via_exp(z):
    """tanh of a float64 z from one exp."""
    return 1.0 - 2.0 / (np.exp(2.0 * z) + 1.0)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def tanh_forward(x, out, out16=None):
    """out = tanh(x); out may be x."""
    real = out.dtype.type
    fast = out.itemsize == 4
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            y = real(_tanh_via_exp(float(x[i, j]))) if fast else np.tanh(x[i, j])
            out[i, j] = y
            if out16 is not None:
                out16[i, j] = to_bf16(y)


@on_contiguous("dx")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def tanh_backward(dout, out, dx):
    """dx = dout * (1 - out**2); dx may be dout."""
    one = dx.dtype.type(1)
    for i in prange(dout.shape[0]):
        for j in range(dout.shape[1]):
            dx[i, j] = dout[i, j] * (one - out[i, j] * out[i, j])


_EXP_CAP = 80.0  # exp(80) = 5.5e34 is finite in float32, and (1 + it)**2 overflows harmlessly to inf

# GELU's exp in float32 is a polynomial of our own, because LLVM has no vector exp to call here (Numba's
# SVML needs an llvmlite built for it, which PyPI's is not), so np.exp stays one libm call an element.
# x = n ln2 + f with |f| <= ln2 / 2 (ln2 split in two, so that n ln2 is exact), e^f by its Taylor
# series to f^7 (error under f^8 / 8! = 2e-9 there), times 2^n built from its bits. Measured against
# exp in float64 over [-87, 88]: within 0.65 of a float32 spacing (2^-23 relative). LLVM vectorises
# it, which np.exp's libm call stops (the per-unit micro benchmarks measure both). Below -87 it
# returns exp(-87) (1.6e-38), not a subnormal: GELU adds it to 1.
_LOG2_E, _LN2_HIGH, _LN2_LOW = 1.4426950408889634, 0.693359375, -2.12194440e-4
_EXP_LOWEST, _EXP_HIGHEST = -87.0, 88.0
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(7, -1, -1))  # f^7 / 7! first


def _exp(x):
    """e**x; in compiled code, the polynomial above for a float32 x and np.exp for a float64."""
    return np.exp(x)


@overload(_exp, jit_options={"cache": True, "nogil": True, "error_model": "numpy"})
def _exp_compiled(x):
    if x != types.float32:
        return lambda x: np.exp(x)
    log2_e, ln2_high, ln2_low = np.float32(_LOG2_E), np.float32(_LN2_HIGH), np.float32(_LN2_LOW)
    lowest, highest = np.float32(_EXP_LOWEST), np.float32(_EXP_HIGHEST)
    c7, c6, c5, c4, c3, c2, c1, c0 = (np.float32(c) for c in _EXP_TAYLOR)

    def exp_float32(x):
        x = min(max(x, lowest), highest)
        n = np.floor(x * log2_e + np.float32(0.5))
        f = (x - n * ln2_high) - n * ln2_low
        p = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + c0
        return p * bits_float32(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return exp_float32


@njit(cache=True, nogil=True, error_model="numpy")
def _gelu(z, one, two_root, cubic, cap):
    """gelu(z) = z * sigmoid(2u), in the dtype of the constants, which the caller converted."""
    e = _exp(min(-two_root * (z + cubic * (z * z * z)), cap))
    return z / (one + e)


@njit(cache=True, nogil=True, error_model="numpy")
def _gelu_slope(z, one, two_root, cubic, three_cubic, cap):
    """gelu'(z) = s + 2 z u' s (1 - s), with s = sigmoid(2u) and 1 - s = e * s."""
    e = _exp(min(-two_root * (z + cubic * (z * z * z)), cap))
    s = one / (one + e)
    return s + z * (two_root * (one + three_cubic * (z * z))) * s * (e * s)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def gelu_forward(x, out, out16=None):
    """out = gelu(x), tanh approximation."""
    real = out.dtype.type
    one, two_root, cubic, cap = real(1), real(2 * GELU_SQRT_2_OVER_PI), real(GELU_CUBIC), real(_EXP_CAP)
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            y = _gelu(x[i, j], one, two_root, cubic, cap)
            out[i, j] = y
            if out16 is not None:
                out16[i, j] = to_bf16(y)


@on_contiguous("dx")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def gelu_backward(dout, x, dx):
    """dx = dout * gelu'(x); dx may be dout."""
    real = dx.dtype.type
    one, two_root, cubic, cap = real(1), real(2 * GELU_SQRT_2_OVER_PI), real(GELU_CUBIC), real(_EXP_CAP)
    three_cubic = real(3 * GELU_CUBIC)
    for i in prange(dout.shape[0]):
        for j in range(dout.shape[1]):
            dx[i, j] = dout[i, j] * _gelu_slope(x[i, j], one, two_root, cubic, three_cubic, cap)


# --- Dense layer -----------------------------------------------------------------------------------
# Every dense kernel is one of two loops over tiles, with its activation chosen at compile time: `kind`
# is a literal (numba.literally), so each activation compiles a loop of its own, the other branches
# pruned, and Numba's disk cache keys it by that value. Forward (_dense_forward_tiles): each tile's
# product (numba_gemm.product_tile), then its bias and activation by the thread that computed it.
# Backward (_dense_backward_columns): a pass over column tiles of dout that applies the activation's
# derivative in place and sums each column for db, in batch order; then _weight_and_input_grads_tiles.
# Both index a tile's rows through views that start at its first column (row = out[i, c0:c1]), from 0:
# indexed from c0 itself, LLVM left the loops scalar (we did not find out why), several times slower.

IDENTITY, RELU, LEAKY_RELU, TANH, GELU = range(5)


@njit(cache=True, nogil=True, error_model="numpy")
def _activation_constants(a, negative_slope):
    """The constants of every activation in a's dtype: (0, 1, the leaky slope, GELU's 2 sqrt(2/pi),
    its cubic coefficient and three times it, the exponent's cap, whether tanh takes the exp form)."""
    real = a.dtype.type
    return (real(0), real(1), real(negative_slope), real(2 * GELU_SQRT_2_OVER_PI), real(GELU_CUBIC),
            real(3 * GELU_CUBIC), real(_EXP_CAP), a.itemsize == 4)


@njit(cache=True, nogil=True, error_model="numpy")
def _activate(z, kind, constants):
    """Activation `kind` of z."""
    zero, one, slope, two_root, cubic, _, cap, fast = constants
    if kind == RELU:
        return max(z, zero)
    if kind == LEAKY_RELU:
        return z if z > zero else z * slope
    if kind == TANH:
        return np.float32(_tanh_via_exp(float(z))) if fast else np.tanh(z)
    if kind == GELU:
        return _gelu(z, one, two_root, cubic, cap)
    return z


@njit(cache=True, nogil=True, error_model="numpy")
def _through_activation(g, saved, kind, constants):
    """The gradient g behind activation `kind`, from what its forward saved: its output (ReLU, leaky
    ReLU, tanh) or its input (GELU)."""
    zero, one, slope, two_root, cubic, three_cubic, cap, _ = constants
    if kind == RELU:
        return g if saved > zero else zero
    if kind == LEAKY_RELU:
        return g * slope if saved <= zero else g
    if kind == TANH:
        return g * (one - saved * saved)
    if kind == GELU:
        return g * _gelu_slope(saved, one, two_root, cubic, three_cubic, cap)
    return g


@njit(cache=True, nogil=True, error_model="numpy")
def _round_row(row, row16):
    """row16 = row rounded to bfloat16. A loop of its own after the row's pass, which LLVM vectorises:
    written inside that pass, the rounding left it scalar, about three times slower."""
    for j in range(row.shape[0]):
        row16[j] = to_bf16(row[j])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _dense_forward_tiles(x, W, b, pre, out, out16, kind, negative_slope):
    """pre = x @ W + b and out = its activation, tile by tile; pre is out itself but for GELU, whose
    backward needs its input."""
    kind = literally(kind)
    constants = _activation_constants(out, negative_slope)
    rows, columns = out.shape
    tiles, counter = product_tiles(rows, columns, x.shape[1]), tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            r0, r1, c0, c1 = product_tile(rows, columns, tiles, tile)
            gemm(x[r0:r1], W[:, c0:c1], pre[r0:r1, c0:c1])
            bias = b[c0:c1]
            for i in range(r0, r1):
                row = out[i, c0:c1]
                if kind == GELU:
                    kept = pre[i, c0:c1]
                    for j in range(c1 - c0):
                        z = kept[j] + bias[j]
                        kept[j] = z
                        row[j] = _activate(z, kind, constants)
                else:  # one view of out: two views of the same row made LLVM's overlap check fail (scalar loop)
                    for j in range(c1 - c0):
                        row[j] = _activate(row[j] + bias[j], kind, constants)
                if out16 is not None:
                    _round_row(row, out16[i, c0:c1])
            tile = next_tile(counter, tiles)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _dense_backward_columns(dout, saved, db, dout16, kind, negative_slope):
    """dout behind activation `kind`, in place, with db its column sums (and dout16 its bf16 copy),
    column tile by column tile, before the products."""
    kind = literally(kind)
    constants = _activation_constants(dout, negative_slope)
    tiles, counter = column_tiles(dout.shape[0], dout.shape[1]), tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            c0, c1 = span(dout.shape[1], tiles, tile, ALIGN_COLUMNS)
            sums = db[c0:c1]
            sums[:] = 0
            for i in range(dout.shape[0]):
                row, h = dout[i, c0:c1], saved[i, c0:c1]
                for j in range(c1 - c0):
                    g = _through_activation(row[j], h[j], kind, constants)
                    row[j] = g
                    sums[j] += g
                if dout16 is not None:
                    _round_row(row, dout16[i, c0:c1])
            tile = next_tile(counter, tiles)


@njit(cache=True, nogil=True, error_model="numpy")
def _weight_and_input_grads(dout, dout16, x, W, dW, dx):
    """dW = x.T @ dout and, unless dx is None, dx = dout @ W.T. The products read dout16 instead of
    dout when it is given."""
    if dout16 is None:
        _weight_and_input_grads_tiles(dout, x, W, dW, dx)
    else:
        _weight_and_input_grads_tiles(dout16, x, W, dW, dx)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _weight_and_input_grads_tiles(dout, x, W, dW, dx):
    """dW's row tiles, then dx's tiles (numba_gemm.product_tile: by columns but for narrow layers),
    claimed from one counter: a thread that finds dW's tiles taken goes on to dx."""
    (fan_in, fan_out), batch = dW.shape, dout.shape[0]
    weight_tiles = weight_gradient_tiles(fan_in, fan_out, batch)
    tiles = weight_tiles + (product_tiles(batch, fan_in, fan_out) if dx is not None else 0)
    counter = tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            if tile < weight_tiles:
                r0, r1 = span(fan_in, weight_tiles, tile, ALIGN_COLUMNS)
                gemm(x[:, r0:r1].T, dout, dW[r0:r1])
            elif dx is not None:
                r0, r1, c0, c1 = product_tile(batch, fan_in, tiles - weight_tiles, tile - weight_tiles)
                gemm(dout[r0:r1], W[c0:c1].T, dx[r0:r1, c0:c1])
            tile = next_tile(counter, tiles)




@on_contiguous("out", "dW", "dx")
@njit(cache=True, nogil=True, error_model="numpy")
def products(x, W, dout, out, dW, dx):
    """A dense layer's three products alone, cut into the tiles the dense kernels use (see
    numpy_backend.products)."""
    matmul_tiles(x, W, out)
    _weight_and_input_grads(dout, None, x, W, dW, dx)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_forward(x, W, b, out, out16=None):
    """out = x @ W + b: each tile's product, then its bias (and its bf16 copy into out16)."""
    _dense_forward_tiles(x, W, b, out, out, out16, IDENTITY, 0.0)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_relu_forward(x, W, b, out, out16=None):
    """out = max(x @ W + b, 0), the bias and ReLU applied to each tile after its product."""
    _dense_forward_tiles(x, W, b, out, out, out16, RELU, 0.0)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_leaky_relu_forward(x, W, b, negative_slope, out, out16=None):
    """out = leaky_relu(x @ W + b), the bias and activation applied to each tile after its product."""
    _dense_forward_tiles(x, W, b, out, out, out16, LEAKY_RELU, negative_slope)


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_tanh_forward(x, W, b, out, out16=None):
    """out = tanh(x @ W + b), the bias and tanh applied to each tile after its product."""
    _dense_forward_tiles(x, W, b, out, out, out16, TANH, 0.0)


@on_contiguous("pre", "out", "out16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_gelu_forward(x, W, b, pre, out, out16=None):
    """pre = x @ W + b and out = gelu(pre), each tile's in one pass after its product."""
    _dense_forward_tiles(x, W, b, pre, out, out16, GELU, 0.0)


@on_contiguous("dW", "db", "dx", "dout16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_backward(dout, x, W, dW, db, dx, dout16=None):
    """dW = x.T @ dout, db = column sums of dout, and dx = dout @ W.T unless dx is None; with
    dout16, dout's bf16 copy is written in the column-sum pass and the products read it."""
    _dense_backward_columns(dout, dout, db, dout16, IDENTITY, 0.0)
    _weight_and_input_grads(dout, dout16, x, W, dW, dx)


@on_contiguous("dout", "dW", "db", "dx", "dout16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_relu_backward(dout, out, x, W, dW, db, dx, dout16=None):
    """dense_backward behind a ReLU: masks dout in place where out is 0 and sums the columns for db
    in the same pass (writing dout16 there too), then the two GEMMs."""
    _dense_backward_columns(dout, out, db, dout16, RELU, 0.0)
    _weight_and_input_grads(dout, dout16, x, W, dW, dx)


@on_contiguous("dout", "dW", "db", "dx", "dout16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_leaky_relu_backward(dout, out, x, W, negative_slope, dW, db, dx, dout16=None):
    """dense_backward behind a leaky ReLU: scales dout in place and sums db in one pass, then the GEMMs."""
    _dense_backward_columns(dout, out, db, dout16, LEAKY_RELU, negative_slope)
    _weight_and_input_grads(dout, dout16, x, W, dW, dx)


@on_contiguous("dout", "dW", "db", "dx", "dout16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_tanh_backward(dout, out, x, W, dW, db, dx, dout16=None):
    """dense_backward behind a tanh: scales dout in place and sums db in one pass, then the GEMMs."""
    _dense_backward_columns(dout, out, db, dout16, TANH, 0.0)
    _weight_and_input_grads(dout, dout16, x, W, dW, dx)


@on_contiguous("dout", "dW", "db", "dx", "dout16")
@njit(cache=True, nogil=True, error_model="numpy")
def dense_gelu_backward(dout, pre, x, W, dW, db, dx, dout16=None):
    """dense_backward behind a GELU: scales dout in place and sums db in one pass, then the GEMMs."""
    _dense_backward_columns(dout, pre, db, dout16, GELU, 0.0)
    _weight_and_input_grads(dout, dout16, x, W, dW, dx)


# --- Layer normalisation ---------------------------------------------------------------------------


@on_contiguous("xhat", "inv_std", "out")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def layernorm_forward(x, gain, bias, eps, xhat, inv_std, out):
    """Layer norm one row at a time, the rows split across the threads."""
    for i in prange(x.shape[0]):
        _layernorm_forward_row(x, gain, bias, eps, xhat, inv_std, out, i)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _layernorm_forward_row(x, gain, bias, eps, xhat, inv_std, out, i):
    """Row i: the mean, then the variance from the centred values (two passes, so no cancellation),
    then xhat and out in a third. The row sums are float64 scalars. (A function of its own: in a
    prange body Numba typed these sums as float32.)"""
    real = out.dtype.type
    width = x.shape[1]
    total = 0.0
    for j in range(width):
        total += x[i, j]
    mean = real(total / width)
    squares = 0.0
    for j in range(width):
        d = x[i, j] - mean
        squares += d * d
    scale = real(1) / np.sqrt(real(squares / width) + real(eps))
    inv_std[i] = scale
    for j in range(width):
        h = (x[i, j] - mean) * scale
        xhat[i, j] = h
        out[i, j] = h * gain[j] + bias[j]


@on_contiguous("dgain", "dbias", "dx")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def layernorm_backward(dout, xhat, inv_std, gain, dgain, dbias, dx):
    """Layer norm's gradients: dgain and dbias by column tiles, each column summed in batch order;
    then one row at a time, a pass that sums the two row means and a pass that writes dx (after
    reading dout, so dx may be dout)."""
    width = dout.shape[1]
    tiles, counter = column_tiles(dout.shape[0], width), tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            c0, c1 = span(width, tiles, tile, ALIGN_COLUMNS)
            gains, biases = dgain[c0:c1], dbias[c0:c1]
            gains[:] = 0
            biases[:] = 0
            for i in range(dout.shape[0]):
                g, h = dout[i, c0:c1], xhat[i, c0:c1]
                for j in range(c1 - c0):
                    gains[j] += g[j] * h[j]
                    biases[j] += g[j]
            tile = next_tile(counter, tiles)
    for i in prange(dout.shape[0]):
        _layernorm_backward_row(dout, xhat, inv_std, gain, dx, i)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _layernorm_backward_row(dout, xhat, inv_std, gain, dx, i):
    """Row i of layer norm's dx: a pass that sums the two row means in float64, then one that writes
    dx (after reading dout, so dx may be dout)."""
    real = dx.dtype.type
    width = dout.shape[1]
    sum_g, sum_g_xhat = 0.0, 0.0
    for j in range(width):
        g = dout[i, j] * gain[j]
        sum_g += g
        sum_g_xhat += g * xhat[i, j]
    mean_g, mean_g_xhat = real(sum_g / width), real(sum_g_xhat / width)
    scale = inv_std[i]
    for j in range(width):
        g = dout[i, j] * gain[j]
        dx[i, j] = (g - mean_g - xhat[i, j] * mean_g_xhat) * scale


# --- Dropout ---------------------------------------------------------------------------------------


@on_contiguous("out")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def draw_uniform(key, first_row, out):
    """out = rows first_row, ... of SplitMix64 stream `key`, as numpy_backend.draw_uniform draws them."""
    real = out.dtype.type
    bits = 24 if out.itemsize == 4 else 53
    drop, scale = np.uint64(64 - bits), real(2.0 ** -bits)
    key, gamma = np.uint64(key), np.uint64(SPLITMIX_GAMMA)
    m1, m2 = np.uint64(SPLITMIX_MULTIPLIERS[0]), np.uint64(SPLITMIX_MULTIPLIERS[1])
    s1, s2, s3 = np.uint64(SPLITMIX_SHIFTS[0]), np.uint64(SPLITMIX_SHIFTS[1]), np.uint64(SPLITMIX_SHIFTS[2])
    width = out.shape[1]
    for i in prange(out.shape[0]):
        row = out[i]
        first = (np.uint64(first_row) + np.uint64(i)) * np.uint64(width) + np.uint64(1)
        for j in range(width):
            z = key + (first + np.uint64(j)) * gamma
            z = (z ^ (z >> s1)) * m1
            z = (z ^ (z >> s2)) * m2
            z = z ^ (z >> s3)
            row[j] = real(np.int64(z >> drop)) * scale  # below 2^53: a signed conversion, which vectorises


@on_contiguous("out", "out16")
@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dropout(x, uniform, rate, out, out16=None):
    """Inverted dropout with the caller's uniform numbers; its own backward. out may be x."""
    # rate is compared in uniform's dtype, as NumPy compares an array with a Python float.
    threshold = uniform.dtype.type(rate)
    keep_scale = out.dtype.type(1 / (1 - rate))
    zero = out.dtype.type(0)
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            y = x[i, j] * keep_scale if uniform[i, j] >= threshold else zero
            out[i, j] = y
            if out16 is not None:
                out16[i, j] = to_bf16(y)


# --- Loss ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _row_max(logits, i):
    """The largest logit of row i, which the losses subtract before exponentiating so none overflows."""
    top = logits[i, 0]
    for j in range(1, logits.shape[1]):
        top = max(top, logits[i, j])
    return top


@on_contiguous("dlogits")
@njit(cache=True, nogil=True, error_model="numpy")
def softmax_cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy and its gradient, one row at a time: the row's maximum, then its
    exponentials and their sum, then the normalised gradient. The mean loss is summed in float64,
    a scalar that never touches an array."""
    batch, classes = logits.shape
    real = dlogits.dtype.type
    total = 0.0
    for i in range(batch):
        top = _row_max(logits, i)
        row_sum = real(0)
        for j in range(classes):
            e = np.exp(logits[i, j] - top)
            dlogits[i, j] = e
            row_sum += e
        total += np.log(row_sum) - (logits[i, labels[i]] - top)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / row_sum
        dlogits[i, labels[i]] -= real(1)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / real(batch)
    return total / batch


@on_contiguous("dlogits")
@njit(cache=True, nogil=True, error_model="numpy")
def softmax_cross_entropy_smoothed(logits, labels, smoothing, dlogits):
    """softmax_cross_entropy against label-smoothed targets, one row at a time as there; the row's
    mean logit joins the loss, and smoothing / K comes off every gradient element."""
    batch, classes = logits.shape
    real = dlogits.dtype.type
    spread, keep = real(smoothing / classes), real(1 - smoothing)
    smoothing_real = real(smoothing)
    total = 0.0
    for i in range(batch):
        top = _row_max(logits, i)
        row_sum = real(0)
        shifted_sum = 0.0
        for j in range(classes):
            shifted = logits[i, j] - top
            shifted_sum += shifted
            e = np.exp(shifted)
            dlogits[i, j] = e
            row_sum += e
        mean_shifted = real(shifted_sum / classes)
        total += np.log(row_sum) - keep * (logits[i, labels[i]] - top) - smoothing_real * mean_shifted
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / row_sum - spread
        dlogits[i, labels[i]] -= keep
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / real(batch)
    return total / batch


@on_contiguous()
@njit(cache=True, nogil=True, error_model="numpy")
def count_correct(logits, labels):
    """Rows whose first largest logit is at the label, as np.argmax breaks ties."""
    correct = 0
    for i in range(logits.shape[0]):
        best = 0
        for j in range(1, logits.shape[1]):
            if logits[i, j] > logits[i, best]:
                best = j
        correct += best == labels[i]
    return correct


# --- Gradient clipping -----------------------------------------------------------------------------


@on_contiguous()
@njit(cache=True, nogil=True, error_model="numpy")
def sum_of_squares(x):
    """The sum of x's squared elements as a float: BLAS's dot of x with itself, as in the reference,
    which reads the array once at memory speed."""
    flat = np.ravel(x)
    return float(np.dot(flat, flat))


# --- Optimizer updates -----------------------------------------------------------------------------
# Each kernel is an entry that flattens its arrays and computes its rule's factors, and one tile loop
# (_update_tiles) whose element update is chosen at compile time: the rule is a literal, as the dense
# kernels' activation is. Every array arrives C-contiguous, so reshape(-1) and np.ravel are views. A rule
# without a state gets the parameter in its place, never written. The bf16 copy, when given, is
# written from each tile once it is updated. (The entry flattens it: flattened inside the parallel
# function, by a helper, Numba's parfors dropped the writes to it.)

SGD, MOMENTUM, NESTEROV, ADAM = range(4)


def _update_run(rule, p, g, s1, s2, f):
    """One update of `rule` of every element of the run p (with its gradient g and states s1, s2),
    with its factors f (the entries below say what they are)."""


@overload(_update_run, jit_options={"cache": True, "nogil": True, "error_model": "numpy"})
def _update_run_compiled(rule, p, g, s1, s2, f):
    # Chosen while typing, by the literal rule: each rule's factors are a tuple of their own length. A
    # loop over whole arrays (a run's views, passed in) is one LLVM vectorises; indexing views made in
    # the parallel loop left it a third slower.
    rule = getattr(rule, "literal_value", None)
    if rule == SGD:
        def sgd(rule, p, g, s1, s2, f):
            for i in range(p.size):
                p[i] = p[i] * f[0] - f[1] * g[i]
        return sgd
    if rule == MOMENTUM:
        def momentum(rule, p, g, s1, s2, f):
            for i in range(p.size):
                s1[i] = s1[i] * f[1] + g[i] + f[2] * p[i]
                p[i] -= f[0] * s1[i]
        return momentum
    if rule == NESTEROV:
        def nesterov(rule, p, g, s1, s2, f):
            for i in range(p.size):
                gi = g[i] + f[2] * p[i]
                s1[i] = s1[i] * f[1] + gi
                p[i] -= f[0] * (gi + f[1] * s1[i])
        return nesterov
    if rule == ADAM:
        def adam(rule, p, g, s1, s2, f):
            for i in range(p.size):
                gi = g[i] + f[3] * p[i]
                s1[i] = s1[i] * f[0] + f[4] * gi
                s2[i] = s2[i] * f[1] + f[5] * gi * gi
                p[i] = p[i] * f[6] - f[7] * s1[i] / (np.sqrt(s2[i] / f[8]) + f[2])
        return adam
    return None


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _update_tiles(rule, p, g, s1, s2, factors, p16):
    """Every element's update of `rule`, in runs of the flat parameter that the threads claim as they
    come free (numba_gemm.next_tile); a run's bounds depend on the size alone."""
    rule = literally(rule)
    tiles, counter = column_tiles(1, p.size), tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            start, stop = span(p.size, tiles, tile, ALIGN_COLUMNS)
            _update_run(rule, p[start:stop], g[start:stop], s1[start:stop], s2[start:stop], factors)
            if p16 is not None:
                _round_row(p[start:stop], p16[start:stop])
            tile = next_tile(counter, tiles)


@on_contiguous("param", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def sgd_step(param, grad, lr, weight_decay, param16=None):
    """param -= lr * (grad + weight_decay * param)."""
    real = param.dtype.type
    # As in the reference, the factor is computed in double and rounded once.
    factors = real(1.0 - lr * weight_decay), real(lr)
    p = param.reshape(-1)
    if param16 is None:
        _update_tiles(SGD, p, np.ravel(grad), p, p, factors, None)
    else:
        _update_tiles(SGD, p, np.ravel(grad), p, p, factors, param16.reshape(-1))


@on_contiguous("param", "velocity", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def momentum_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """v = momentum * v + grad + weight_decay * param; param -= lr * v."""
    real = param.dtype.type
    factors = real(lr), real(momentum), real(weight_decay)
    p, v = param.reshape(-1), velocity.reshape(-1)
    if param16 is None:
        _update_tiles(MOMENTUM, p, np.ravel(grad), v, v, factors, None)
    else:
        _update_tiles(MOMENTUM, p, np.ravel(grad), v, v, factors, param16.reshape(-1))


@on_contiguous("param", "velocity", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def nesterov_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """g' = grad + weight_decay * param; v = momentum * v + g'; param -= lr * (g' + momentum * v)."""
    real = param.dtype.type
    factors = real(lr), real(momentum), real(weight_decay)
    p, v = param.reshape(-1), velocity.reshape(-1)
    if param16 is None:
        _update_tiles(NESTEROV, p, np.ravel(grad), v, v, factors, None)
    else:
        _update_tiles(NESTEROV, p, np.ravel(grad), v, v, factors, param16.reshape(-1))


@on_contiguous("param", "m", "v", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """Adam with bias correction and L2 weight decay added to the gradient."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, 0.0, step, param16)


@on_contiguous("param", "m", "v", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """AdamW: the weight decay shrinks the parameter instead of entering the moments."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, 0.0, weight_decay, step, param16)


@njit(cache=True, nogil=True, error_model="numpy")
def _adam(param, grad, m, v, lr, beta1, beta2, eps, l2_decay, decoupled_decay, step, param16):
    """The update of adam_step and adamw_step, as numpy_backend's _adam: l2_decay * param joins the
    gradient, decoupled_decay shrinks the parameter (each step passes 0 for the other)."""
    real = param.dtype.type
    # Factors are computed in double and rounded once, as the reference's Python floats are.
    factors = (real(beta1), real(beta2), real(eps), real(l2_decay), real(1.0 - beta1), real(1.0 - beta2),
               real(1.0 - lr * decoupled_decay), real(lr / (1 - beta1 ** step)), real(1 - beta2 ** step))
    p, g, m1, v1 = param.reshape(-1), np.ravel(grad), m.reshape(-1), v.reshape(-1)
    if param16 is None:
        _update_tiles(ADAM, p, g, m1, v1, factors, None)
    else:
        _update_tiles(ADAM, p, g, m1, v1, factors, param16.reshape(-1))
