"""The Numba backend's dense layer: its forward and backward kernels and `products`.

Every dense kernel is one of two loops over tiles, with its activation chosen at compile time: `kind`
is a literal (numba.literally), so each activation compiles a loop of its own, the other branches
pruned, and Numba's disk cache keys it by that value. Forward (_dense_forward_tiles): each tile's
product (numba_gemm.product_tile), then its bias and activation by the thread that computed it.
Backward (_dense_backward_columns): a pass over column tiles of dout that applies the activation's
derivative in place and sums each column for db, in batch order; then _weight_and_input_grads_tiles.
Both index a tile's rows through views that start at its first column (row = out[i, c0:c1]), from 0:
indexed from c0 itself, LLVM left the loops scalar (we did not find out why), several times slower.
"""

import numpy as np
from numba import literally, njit, prange

from fastnet.backends.numba_bf16 import round_row
from fastnet.backends.numba_contiguous import on_contiguous
from fastnet.backends.numba_elementwise import _EXP_CAP, _gelu, _gelu_slope, _tanh_via_exp
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
from fastnet.backends.numpy_backend import GELU_CUBIC, GELU_SQRT_2_OVER_PI

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


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _dense_forward_tiles(x, W, b, pre, out, out16, kind, negative_slope):
    """pre = x @ W + b and out = its activation, tile by tile; pre is out itself but for GELU, whose
    backward needs its input."""
    kind = literally(kind)
    constants = _activation_constants(out, negative_slope)
    rows, columns = out.shape
    tiles, counter = product_tiles(rows, columns, x.shape[1], x.itemsize), tile_counter()
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
                    round_row(row, out16[i, c0:c1])
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
                    round_row(row, dout16[i, c0:c1])
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
    weight_tiles = weight_gradient_tiles(fan_in, fan_out, batch, dout.itemsize)
    tiles = weight_tiles + (product_tiles(batch, fan_in, fan_out, dout.itemsize) if dx is not None else 0)
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
