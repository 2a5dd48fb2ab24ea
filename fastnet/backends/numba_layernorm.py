"""The Numba backend's layer normalisation: a row at a time, the rows split across the threads, and
the gain and bias gradients by column tiles."""

import numpy as np
from numba import njit, prange

from fastnet.backends.numba_contiguous import on_contiguous
from fastnet.backends.numba_gemm import ALIGN_COLUMNS, column_tiles, next_tile, span, thread_count, tile_counter


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
