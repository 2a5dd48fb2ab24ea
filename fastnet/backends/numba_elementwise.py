"""The Numba backend's elementwise kernels: gathering a batch's rows, the bfloat16 conversions,
the activations and dropout, each a pass over rows split across the threads with `prange`, and the
scalar functions of the activations that the dense epilogues (numba_dense) apply too. Numba's disk
cache of numba_dense's tile loops does not see a change to those: delete the cached .nbi and .nbc
files after one (numba_backend says why)."""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fastnet.backends.numba_bf16 import bits_float32, from_bf16, to_bf16
from fastnet.backends.numba_contiguous import on_contiguous
from fastnet.backends.numpy_backend import (
    GELU_CUBIC,
    GELU_SQRT_2_OVER_PI,
    SPLITMIX_GAMMA,
    SPLITMIX_MULTIPLIERS,
    SPLITMIX_SHIFTS,
)

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
