"""Every other backend against the NumPy reference: kernel by kernel, whole models, real training runs,
and the promises a fast backend makes (no float64 in a float32 run, no allocation per step).

The tests are parametrised over every registered backend but numpy, so a new backend is tested as soon
as it is registered. Each kernel is called twice on identical arguments, once per backend, and every
array argument afterwards (outputs, in-place updates, and inputs, which must be left alone) and the
return value are compared with numpy's.

Tolerances (see assert_matches). float64 results must agree to FLOAT64_TOL: far looser than float64
rounding, far tighter than any real mistake. float32 results get float32_tol(K), where K is the length
of the sums the kernel computes; elementwise kernels have K = 1. Both are relative, plus an absolute
part of the same size times the scale of the result (for a sum, of its terms), for values near 0.
bfloat16 results (uint16 arrays) are compared by value, to within one bf16 ulp, 2^-7 relative: each
is the rounding of a float32 result that agrees to float32_tol, and a rounding flips at most one ulp.
Their rounding itself is tested bit for bit.
"""

import contextlib
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastnet import backends
from fastnet.activations import ACTIVATIONS
from fastnet.backends import numpy_backend as ref
from fastnet.config import TrainConfig
from fastnet.data import Augmentation, ComponentFlip, ProjectedAugmentation
from fastnet.model import MLP
from fastnet.optim import UPDATE_RULES, Optimizer
from fastnet.run_folder import TIMING_METRICS
from fastnet.train import train
from helpers import assert_close, real_data_path, save_brightness_classes, unavailable

OTHER_BACKENDS = [name for name in backends.available() if name != "numpy"]

if importlib.util.find_spec("numba"):
    # Numba warns that BLAS is faster on contiguous arrays when the tests pass strided ones on purpose.
    pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


@pytest.fixture(scope="module", params=OTHER_BACKENDS or [None])
def other(request):
    """The name of a backend to compare with numpy."""
    if request.param is None:
        unavailable("no backend but numpy is available: pip install numba")
    return request.param


# --- Tolerances --------------------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7, the spacing of float32 numbers at 1
FLOAT64_TOL = 1e-12
BF16_ULP = 2.0 ** -7  # the largest spacing of bfloat16 numbers relative to their value (at 1: 2^-7)


def float32_tol(reduction_length):
    """The relative tolerance for two float32 computations of a sum of `reduction_length` terms.

    Each addition rounds to within EPS32 / 2 of the running total. Rounding errors of random data
    behave like independent random signs, so over K additions they grow like sqrt(K) * EPS32 times
    the size of the running totals (the worst case, K * EPS32, needs every rounding to go the same
    way). Two implementations err independently, which doubles the bound, and a margin of 2 makes 4.
    Measured on this project's kernels, numpy's own float32 GEMM stays within 0.3 sqrt(K) EPS32 of the
    exact result. Elementwise kernels are K = 1: a few ulps.
    """
    return 4 * math.sqrt(max(reduction_length, 1)) * EPS32


def assert_matches(actual, expected, reduction_length, what, magnitude=None):
    """actual == expected in shape and dtype, and in value to within the tolerance of expected's dtype.

    reduction_length None means exactly (integers, selections, inputs that must be left alone). The
    absolute part of the tolerance is the relative one times a scale: a result near 0 is a sum that
    cancelled, and its rounding error is that of the terms, not of the result. The scale is the
    largest of `magnitude` (for a sum: the sum of its terms' absolute values, see term_magnitudes)
    and |expected|.
    """
    expected = np.asarray(expected)
    if expected.dtype == np.uint16 and reduction_length is not None:  # bfloat16 results, by value
        actual, expected = bf16_values(np.asarray(actual)), bf16_values(expected)
        rtol = BF16_ULP + float32_tol(reduction_length)
    elif reduction_length is None or not np.issubdtype(expected.dtype, np.floating):
        rtol = 0.0
    elif expected.dtype == np.float64:
        rtol = FLOAT64_TOL
    else:
        rtol = float32_tol(reduction_length)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if magnitude is not None and np.size(magnitude):
        scale = max(scale, float(np.max(magnitude)))
    try:
        assert_close(actual, expected, rtol=rtol, atol=rtol * scale if rtol else 0.0)  # a NaN scale stays out
    except AssertionError as exc:
        raise AssertionError(f"{what}, shape {expected.shape} {expected.dtype}, rtol {rtol:.3g}, "
                             f"atol {rtol * scale:.3g}: {exc}") from None


def bf16_values(bits):
    """The float32 values of bfloat16 bits (uint16), computed here, not by a kernel."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_bf16(a):
    """The bfloat16 bits nearest to float32 `a`, by the reference kernel (itself tested against
    ml_dtypes in test_bf16.py)."""
    a = np.asarray(a, np.float32)
    bits = np.empty(a.shape, np.uint16)
    ref.round_to_bf16(a, bits)
    return bits


def assert_loss_matches(actual, expected, dtype, what):
    """The mean loss, a Python float: rel 1e-6 for float32 (a mean of float32 row losses summed in
    different orders) or 1e-12 for float64, and as much absolute for a loss near 0."""
    assert type(actual) is float, f"{what} returned {type(actual).__name__}, not a Python float"
    tol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-12
    assert actual == pytest.approx(expected, rel=tol, abs=tol), what


# --- Running one kernel on both backends ------------------------------------------------------------

COVERED = set()  # the kernels that have an equivalence test below; see the last test of the file


def covers(*kernels):
    """Marks a test as the equivalence test of these kernels."""
    unknown = set(kernels) - set(backends.KERNELS)
    assert not unknown, f"not kernels: {unknown}"
    COVERED.update(kernels)
    return lambda test: test


def term_magnitudes(kernel, make_args):
    """For a kernel that is linear in each input (the dense layers, forward and backward): its outputs
    computed by the reference from the absolute values of the inputs. Each element is then the sum
    of the absolute values of the terms that the element sums, the scale its rounding error is
    relative to. (The ReLU's mask is unchanged: |out| > 0 where out > 0.)"""
    args = [np.abs(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in make_args()]
    getattr(ref, kernel)(*args)
    # strict=False: a call may leave trailing parameters at their defaults (out16=None ...)
    return dict(zip(inspect.signature(getattr(ref, kernel)).parameters, args, strict=False))


def check_kernel(backend, kernel, make_args, reductions, what="", linear=False, magnitudes=None):
    """Call `kernel` of numpy and of `backend`, each on its own make_args() (two calls, so two equal
    sets of arrays laid out alike), and compare the results.

    reductions maps the names of the arguments a kernel writes to the length of the sums behind
    them; every other array argument must come back exactly as numpy leaves it. For a `linear`
    kernel, the tolerances scale with term_magnitudes; for another, `magnitudes` may map argument
    names to the scale of their terms. Both backends must keep the return convention (see
    assert_returns). Returns the two results.
    """
    names = list(inspect.signature(getattr(ref, kernel)).parameters)
    expected_args, actual_args = make_args(), make_args()
    expected = getattr(ref, kernel)(*expected_args)
    actual = getattr(backends.get(backend), kernel)(*actual_args)
    label = f"{backend}.{kernel}{what}"
    if magnitudes is None:
        magnitudes = term_magnitudes(kernel, make_args) if linear else {}

    # strict=False: names has those of parameters left at their defaults too
    for name, got, want in zip(names, actual_args, expected_args, strict=False):
        if isinstance(want, np.ndarray):
            magnitude = magnitudes.get(name) if name in reductions else None
            assert_matches(got, want, reductions.get(name), f"{label}: argument {name}", magnitude)

    assert_returns(f"numpy.{kernel}{what}", kernel, expected)
    assert_returns(label, kernel, actual)
    assert type(actual) is type(expected), f"{label} returned {type(actual).__name__}, numpy {type(expected).__name__}"
    return actual, expected


# The kernels whose result is a number; every other kernel writes arrays and returns None.
NUMBER_KERNELS = {"softmax_cross_entropy", "softmax_cross_entropy_smoothed", "count_correct", "sum_of_squares"}
assert NUMBER_KERNELS <= set(backends.KERNELS)


def assert_returns(label, kernel, result):
    """The return convention of numpy_backend's docstring: a number kernel returns a Python float or
    int, and every other kernel None, so that no caller can read a result that is not in its outputs."""
    if kernel in NUMBER_KERNELS:
        assert type(result) in (float, int), f"{label} returned {type(result).__name__}, not a Python number"
    else:
        assert result is None, f"{label} returned {type(result).__name__}: a kernel that writes arrays returns None"


def laid_out(a, layout, axis=-1):
    """The values of `a` in a layout: "C" contiguous, "F" Fortran-ordered, or "strided": every other
    element along `axis` of a larger array whose other elements are NaN, so reading them shows."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    axis %= a.ndim
    shape = list(a.shape)
    shape[axis] *= 2
    big = np.full(shape, np.nan, a.dtype)
    view = big[(slice(None),) * axis + (slice(None, None, 2),)]
    view[...] = a
    return view


def garbage(shape, dtype):
    """A C-contiguous output buffer full of NaN, as a reused workspace would hold stale values: a
    kernel must overwrite, not accumulate into, its outputs."""
    return np.full(shape, np.nan, dtype)


DTYPES = ["float32", "float64"]
LAYOUTS = ["C", "F", "strided"]
dims = st.integers(1, 70)
seeds = st.integers(0, 2**32 - 1)
shapes = st.tuples(dims, dims, dims)  # (batch, fan_in, fan_out)
SETTINGS = settings(max_examples=30, deadline=None)
AWKWARD = [(1, 1, 1), (1, 70, 1), (70, 1, 70), (33, 17, 1)]  # batch 1, width 1, odd sizes


def with_awkward_shapes(**other_arguments):
    """Hypothesis examples that run every time: the AWKWARD shapes."""
    def decorate(test):
        for shape in AWKWARD:
            test = example(shape=shape, seed=0, **other_arguments)(test)
        return test
    return decorate


# --- Data ---------------------------------------------------------------------------------------------
# With with16, a float32 gather also writes the batch's bfloat16 copy (out16), as a bf16 run asks.

def bf16_output(shape, dtype, with16):
    """() or (out16,): the optional last argument, for float32 batches only."""
    return (np.zeros(shape, np.uint16),) if with16 and np.dtype(dtype) == np.float32 else ()


def assert_bf16_output_is_rounded(other, kernel, make_args):
    """The backend's out16, when there is one, is exactly its out rounded."""
    args = make_args()
    getattr(backends.get(other), kernel)(*args)
    if args[-1].dtype == np.uint16:
        assert np.array_equal(args[-1], to_bf16(args[-2])), f"{other}.{kernel}: out16 is not out rounded"

@covers("gather_normalize")
@pytest.mark.parametrize("source, dtype", [("uint8", "float32"), ("uint8", "float64"), ("float32", "float32")])
@SETTINGS
@given(count=st.integers(1, 40), batch=dims, width=dims, seed=seeds, with16=st.booleans())
@example(count=1, batch=5, width=3, seed=0, with16=False)   # every index the same
@example(count=9, batch=1, width=70, seed=1, with16=True)  # batch 1
def test_gather_normalize(other, source, dtype, count, batch, width, seed, with16):
    def make_args():
        rng = np.random.default_rng(seed)
        if source == "uint8":
            images = rng.integers(0, 256, (count, width), dtype=np.uint8)
            shift, scale = rng.uniform(0, 255, width), rng.uniform(0.5, 2, width) / 64
        else:
            images = rng.random((count, width), dtype=np.float32)
            shift, scale = rng.uniform(0, 1, width), rng.uniform(2, 8, width)
        indices = rng.integers(0, count, batch, dtype=np.int64)  # with repeats when batch > count
        return (images, indices, shift.astype(dtype), scale.astype(dtype), garbage((batch, width), dtype),
                *bf16_output((batch, width), dtype, with16))

    check_kernel(other, "gather_normalize", make_args, {"out": 1, "out16": 1}, f" ({source} images)")
    assert_bf16_output_is_rounded(other, "gather_normalize", make_args)


@covers("augment_gather_normalize")
@pytest.mark.parametrize("source, dtype", [("uint8", "float32"), ("uint8", "float64"), ("float32", "float32")])
@SETTINGS
@given(count=st.integers(1, 20), batch=st.integers(1, 20), image=st.tuples(st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 4)), cutout_size=st.integers(0, 6), seed=seeds, with16=st.booleans())
@example(count=1, batch=3, image=(1, 1, 1), cutout_size=0, seed=0, with16=False)  # one pixel, one index
@example(count=5, batch=1, image=(9, 7, 3), cutout_size=20, seed=1, with16=True)  # a cutout wider than the image
def test_augment_gather_normalize(other, source, dtype, count, batch, image, cutout_size, seed, with16):
    height, width, channels = image
    features = height * width * channels

    def make_args():
        rng = np.random.default_rng(seed)
        if source == "uint8":
            images = rng.integers(0, 256, (count, *image), dtype=np.uint8)
            shift, scale = rng.uniform(0, 255, features), rng.uniform(0.5, 2, features) / 64
        else:
            images = rng.random((count, *image), dtype=np.float32)
            shift, scale = rng.uniform(0, 1, features), rng.uniform(2, 8, features)
        indices = rng.integers(0, count, batch, dtype=np.int64)
        flips = rng.integers(0, 2, batch, dtype=np.uint8)
        # Offsets reach past the image, so some samples are all padding.
        offsets = rng.integers(-max(height, width) - 1, max(height, width) + 2, (batch, 2))
        centres = np.stack([rng.integers(0, height, batch), rng.integers(0, width, batch)], axis=1)
        return (images, indices, flips, offsets, centres, cutout_size, shift.astype(dtype), scale.astype(dtype),
                garbage((batch, features), dtype), *bf16_output((batch, features), dtype, with16))

    check_kernel(other, "augment_gather_normalize", make_args, {"out": 1, "out16": 1}, f" ({source} images {image})")
    assert_bf16_output_is_rounded(other, "augment_gather_normalize", make_args)


@covers("gather_flip_components")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(count=st.integers(1, 30), batch=dims, width=dims, seed=seeds, with16=st.booleans())
@example(count=1, batch=4, width=3, seed=0, with16=False)   # every index the same
@example(count=7, batch=1, width=65, seed=1, with16=True)  # batch 1
def test_gather_flip_components(other, dtype, count, batch, width, seed, with16):
    def make_args():
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((count, width)).astype(dtype)
        indices = rng.integers(0, count, batch, dtype=np.int64)
        flips = rng.integers(0, 2, batch, dtype=np.uint8)
        signs = np.where(rng.random(width) < 0.5, -1.0, 1.0).astype(dtype)
        return (inputs, indices, flips, signs, garbage((batch, width), dtype),
                *bf16_output((batch, width), dtype, with16))

    check_kernel(other, "gather_flip_components", make_args, {"out": 1, "out16": 1})
    assert_bf16_output_is_rounded(other, "gather_flip_components", make_args)


# --- Dense layers -------------------------------------------------------------------------------------

def dense_inputs(rng, shape, dtype, layout):
    """x (B, D), W (D, H), b (H,) and an upstream gradient dout (B, H) in `layout`; x and dout are
    strided along their rows, W and b along their columns."""
    batch, fan_in, fan_out = shape
    x = laid_out(rng.standard_normal((batch, fan_in)).astype(dtype), layout, axis=1)
    W = laid_out((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype), layout, axis=0)
    b = laid_out(rng.standard_normal(fan_out).astype(dtype), layout)
    dout = laid_out(rng.standard_normal((batch, fan_out)).astype(dtype), layout, axis=1)
    return x, W, b, dout


@covers("dense_forward", "dense_relu_forward")
@pytest.mark.parametrize("kernel", ["dense_forward", "dense_relu_forward"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds)
@with_awkward_shapes()
def test_dense_forward(other, kernel, layout, dtype, shape, seed):
    batch, fan_in, fan_out = shape

    def make_args():
        x, W, b, _ = dense_inputs(np.random.default_rng(seed), shape, dtype, layout)
        return x, W, b, garbage((batch, fan_out), dtype)

    check_kernel(other, kernel, make_args, {"out": fan_in}, f" {layout} {shape}", linear=True)


@covers("dense_backward", "dense_relu_backward")
@pytest.mark.parametrize("kernel", ["dense_backward", "dense_relu_backward"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds, with_dx=st.booleans())
@with_awkward_shapes(with_dx=True)
@with_awkward_shapes(with_dx=False)
@example(shape=(43, 1, 1), seed=0, with_dx=False)  # dW, one element, is a sum that cancels to 1 % of its terms
def test_dense_backward(other, kernel, layout, dtype, shape, seed, with_dx):
    batch, fan_in, fan_out = shape

    def make_args():
        rng = np.random.default_rng(seed)
        x, W, _, dout = dense_inputs(rng, shape, dtype, layout)
        outputs = [garbage((fan_in, fan_out), dtype), garbage(fan_out, dtype),
                   garbage((batch, fan_in), dtype) if with_dx else None]
        if kernel == "dense_backward":
            return (dout, x, W, *outputs)
        # The ReLU's forward output, about half of it 0; dout is masked in place where it is.
        out = np.maximum(rng.standard_normal((batch, fan_out)), 0).astype(dtype)
        return (dout, out, x, W, *outputs)

    # dW and db sum over the batch, dx over the output features; the masked dout must be exact.
    reductions = {"dW": batch, "db": batch, "dx": fan_out}
    check_kernel(other, kernel, make_args, reductions, f" {layout} {shape} dx={'array' if with_dx else None}",
                 linear=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*AWKWARD, (128, 3072, 512), (128, 512, 10)])
@pytest.mark.parametrize("with_dx", [True, False])
def test_products_alone_are_the_dense_kernels_products(other, layout, dtype, shape, with_dx):
    """`products`, the yardstick fastnet bench holds a step against, computes what the dense kernels'
    products do, through the same tiles (the default network's layers among the shapes)."""
    batch, fan_in, fan_out = shape

    def make_args():
        x, W, _, dout = dense_inputs(np.random.default_rng(sum(shape)), shape, dtype, layout)
        return (x, W, dout, garbage((batch, fan_out), dtype), garbage((fan_in, fan_out), dtype),
                garbage((batch, fan_in), dtype) if with_dx else None)

    reductions = {"out": fan_in, "dW": batch, "dx": fan_out}
    check_kernel(other, "products", make_args, reductions, f" {layout} {shape}", linear=True)


@covers("dense_forward", "dense_relu_forward", "dense_backward", "dense_relu_backward")
@pytest.mark.parametrize("shape", [(128, 3072, 512), (128, 512, 10)])
def test_dense_kernels_at_the_default_networks_shapes(other, shape):
    """The first and last layers of the default 3072-512-512-10 network, batch 128, float32."""
    batch, fan_in, fan_out = shape
    rng = np.random.default_rng(sum(shape))
    x, W, b, dout = dense_inputs(rng, shape, "float32", "C")
    out = np.maximum(rng.standard_normal((batch, fan_out)), 0).astype(np.float32)

    for kernel in ("dense_forward", "dense_relu_forward"):
        check_kernel(other, kernel, lambda: (x.copy(), W.copy(), b.copy(), garbage((batch, fan_out), np.float32)),
                     {"out": fan_in}, linear=True)

    def backward_args(*forward_output):
        return lambda: (dout.copy(), *(o.copy() for o in forward_output), x.copy(), W.copy(),
                        garbage(W.shape, np.float32), garbage(fan_out, np.float32), garbage(x.shape, np.float32))

    reductions = {"dW": batch, "db": batch, "dx": fan_out}
    check_kernel(other, "dense_backward", backward_args(), reductions, linear=True)
    check_kernel(other, "dense_relu_backward", backward_args(out), reductions, linear=True)


@covers("relu_backward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans())
@example(shape=(1, 1), seed=0, in_place=True)
def test_relu_backward(other, layout, dtype, shape, seed, in_place):
    def make_args():
        rng = np.random.default_rng(seed)
        dout = laid_out(rng.standard_normal(shape).astype(dtype), layout, axis=1)
        out = laid_out(np.maximum(rng.standard_normal(shape), 0).astype(dtype), layout, axis=0)
        return dout, out, dout if in_place else garbage(shape, dtype)

    # A selection, no arithmetic: exact (reductions empty), including dout when dx is dout.
    check_kernel(other, "relu_backward", make_args, {}, f" {layout} {shape} in_place={in_place}")


# --- Other activations, layer norm, dropout -----------------------------------------------------------

def activation_of(kernel):
    """The description (fastnet.activations) of the activation that `kernel` belongs to."""
    return next(a for a in ACTIVATIONS.values() if kernel in (a.forward, a.backward, a.dense_forward, a.dense_backward))


ELEMENTWISE_FORWARD = {a.forward: a.scalars for a in ACTIVATIONS.values()}  # kernel: scalars between x and out
# kernel: (what it reads the derivative from, its scalars); relu_backward has a test of its own above
ELEMENTWISE_BACKWARD = {a.backward: ("input" if a.reads_input else "output", a.scalars)
                        for a in ACTIVATIONS.values() if a.name != "relu"}


def slope_error_scale(kernel, saved):
    """How much the last-bit differences between backends weigh in an activation's slope, per unit of
    upstream gradient: 1 for leaky ReLU (exact); 1 + out**2 for tanh, whose 1 - out**2 cancels; for
    GELU, whose tanh(.) may differ in its last bit between NumPy's and the C library's, the largest
    weight of that tanh in gelu'(z), 1 + |z| sqrt(2/pi) (1 + 3 * 0.044715 z**2)."""
    saved = np.asarray(saved, np.float64)
    if "leaky_relu" in kernel:
        return np.ones_like(saved)
    if "tanh" in kernel:
        return 1 + saved * saved
    return 1 + np.abs(saved) * ref.GELU_SQRT_2_OVER_PI * (1 + 3 * ref.GELU_CUBIC * saved * saved)


def activation_saved(kernel, z):
    """What the backward kernel of `kernel`'s activation reads for pre-activations z: the output of
    leaky ReLU or tanh, or z itself for GELU."""
    if "leaky_relu" in kernel:
        return np.where(z > 0, z, 0.01 * z)
    if "tanh" in kernel:
        return np.tanh(z)
    return z


@covers(*ELEMENTWISE_FORWARD)
@pytest.mark.parametrize("kernel", list(ELEMENTWISE_FORWARD))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans(), magnitude=st.sampled_from([1.0, 10.0]))
@example(shape=(1, 1), seed=0, in_place=True, magnitude=1.0)
def test_activation_forward(other, kernel, layout, dtype, shape, seed, in_place, magnitude):
    scalars = ELEMENTWISE_FORWARD[kernel]

    def make_args():
        rng = np.random.default_rng(seed)
        x = laid_out((rng.standard_normal(shape) * magnitude).astype(dtype), layout, axis=1)
        return (x, *scalars, x if in_place else garbage(shape, dtype))

    reductions = {"out": 1, "x": 1} if in_place else {"out": 1}
    magnitudes = None
    if kernel == "gelu_forward":  # x/2 * (1 + tanh(.)): the 1 + tanh cancels for x < 0
        x = np.abs(make_args()[0].astype(np.float64))
        magnitudes = {"out": x * slope_error_scale(kernel, x), "x": x * slope_error_scale(kernel, x)}
    check_kernel(other, kernel, make_args, reductions, f" {layout} {shape} in_place={in_place}",
                 magnitudes=magnitudes)


def test_the_float32_exp_of_gelu_is_within_an_ulp_of_exp(other):
    """numba_elementwise._exp, which the GELU kernels call: in float32 a polynomial of the backend's own,
    within one float32 spacing (2^-23 relative) of exp over [-87, 88], held to exp(-87) below it and
    exp(88) above, NaN kept; in float64 the C library's exp, bit for bit. (Not NumPy's: on a CPU with
    AVX-512, NumPy's float64 exp is a SIMD routine of its own, which differs in the last bit.)"""
    from numba import njit

    from fastnet.backends.numba_elementwise import _exp

    exp = njit(lambda x: _exp(x))
    x = np.linspace(-87, 88, 350_001, dtype=np.float32)
    got = np.array([exp(v) for v in x[::50]] + [exp(v) for v in x[-1000:]], np.float32)
    want = np.exp(np.concatenate([x[::50], x[-1000:]]).astype(np.float64))
    assert got.dtype == np.float32 and np.max(np.abs(got - want) / want) < 2.0 ** -23
    edges = [exp(np.float32(v)) for v in (-1000, -88, np.inf, 1000, np.nan)]
    assert edges[:2] == [exp(np.float32(-87))] * 2 and edges[2] == edges[3] == exp(np.float32(88))
    assert np.isnan(edges[4])
    doubles = np.linspace(-700, 700, 1001)
    got = np.array([exp(v) for v in doubles])
    assert np.array_equal(got, [math.exp(v) for v in doubles])
    assert_close(got, np.exp(doubles), rtol=2.0 ** -51, atol=0)


@covers(*ELEMENTWISE_BACKWARD)
@pytest.mark.parametrize("kernel", list(ELEMENTWISE_BACKWARD))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans())
@example(shape=(1, 1), seed=0, in_place=True)
def test_activation_backward(other, kernel, layout, dtype, shape, seed, in_place):
    _, scalars = ELEMENTWISE_BACKWARD[kernel]

    def make_args():
        rng = np.random.default_rng(seed)
        dout = laid_out(rng.standard_normal(shape).astype(dtype), layout, axis=1)
        saved = activation_saved(kernel, rng.standard_normal(shape) * 2).astype(dtype)
        return (dout, laid_out(saved, layout, axis=0), *scalars, dout if in_place else garbage(shape, dtype))

    reductions = {"dx": 1, "dout": 1} if in_place else {"dx": 1}
    dout, saved = make_args()[:2]
    scale = np.abs(dout.astype(np.float64)) * slope_error_scale(kernel, saved)
    check_kernel(other, kernel, make_args, reductions, f" {layout} {shape} in_place={in_place}",
                 magnitudes={"dx": scale, "dout": scale})


# The dense ReLU kernels have tests of their own above, with dense_forward and dense_backward.
DENSE_ACTIVATION_FORWARD = tuple(a.dense_forward for a in ACTIVATIONS.values() if a.name != "relu")
DENSE_ACTIVATION_BACKWARD = tuple(a.dense_backward for a in ACTIVATIONS.values() if a.name != "relu")


def dense_activation_forward_args(kernel, x, W, b, dtype):
    """(x, W, b, *scalars, [pre,] out) for dense_forward or a dense_<activation>_forward kernel."""
    batch, fan_out = x.shape[0], W.shape[1]
    if kernel == "dense_forward":
        return x, W, b, garbage((batch, fan_out), dtype)
    act = activation_of(kernel)
    pre = (garbage((batch, fan_out), dtype),) if act.reads_input else ()
    return x, W, b, *act.scalars, *pre, garbage((batch, fan_out), dtype)


def dense_magnitudes(x, W, b):
    """The scale of the terms of x @ W + b (see term_magnitudes). The activations' slopes are at most
    1.13 (GELU's), so the outputs' rounding errors are of the same scale."""
    scale = np.abs(x) @ np.abs(W) + np.abs(b)
    return {"out": scale, "pre": scale}


def dense_activation_backward_magnitudes(kernel, dout, saved, x, W):
    """The scale of the terms of each result of dense_<activation>_backward: the scaled dout errs
    like slope_error_scale, and dW, db and dx sum it as dense_backward does."""
    scaled = np.abs(dout.astype(np.float64)) * slope_error_scale(kernel, saved)
    x, W = np.abs(x.astype(np.float64)), np.abs(W.astype(np.float64))
    return {"dout": scaled, "dW": x.T @ scaled, "db": scaled.sum(axis=0), "dx": scaled @ W.T}


@covers(*DENSE_ACTIVATION_FORWARD)
@pytest.mark.parametrize("kernel", DENSE_ACTIVATION_FORWARD)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds)
@with_awkward_shapes()
def test_dense_activation_forward(other, kernel, layout, dtype, shape, seed):
    fan_in = shape[1]

    def make_args():
        x, W, b, _ = dense_inputs(np.random.default_rng(seed), shape, dtype, layout)
        return dense_activation_forward_args(kernel, x, W, b, dtype)

    x, W, b, _ = dense_inputs(np.random.default_rng(seed), shape, "float64", "C")
    check_kernel(other, kernel, make_args, {"out": fan_in, "pre": fan_in}, f" {layout} {shape}",
                 magnitudes=dense_magnitudes(x, W, b))


@covers(*DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("kernel", DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds, with_dx=st.booleans())
@with_awkward_shapes(with_dx=True)
@with_awkward_shapes(with_dx=False)
def test_dense_activation_backward(other, kernel, layout, dtype, shape, seed, with_dx):
    batch, fan_in, fan_out = shape

    def make_args():
        rng = np.random.default_rng(seed)
        x, W, _, dout = dense_inputs(rng, shape, dtype, layout)
        saved = activation_saved(kernel, rng.standard_normal((batch, fan_out)) * 2).astype(dtype)
        outputs = [garbage((fan_in, fan_out), dtype), garbage(fan_out, dtype),
                   garbage((batch, fan_in), dtype) if with_dx else None]
        scalars = activation_of(kernel).scalars
        return (dout, saved, x, W, *scalars, *outputs)

    # dout is scaled in place by the activation's slope (elementwise), then the sums of dense_backward.
    reductions = {"dW": batch, "db": batch, "dx": fan_out, "dout": 1}
    check_kernel(other, kernel, make_args, reductions, f" {layout} {shape} dx={'array' if with_dx else None}",
                 magnitudes=dense_activation_backward_magnitudes(kernel, *make_args()[:4]))


@covers(*DENSE_ACTIVATION_FORWARD, *DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", "gelu"])
@pytest.mark.parametrize("shape", [(128, 3072, 512), (128, 512, 512)])
def test_dense_activation_kernels_at_the_default_networks_shapes(other, activation, shape):
    """The default network's first and hidden layers, batch 128, float32, with the other activations."""
    batch, fan_in, fan_out = shape
    rng = np.random.default_rng(sum(shape))
    x, W, b, dout = dense_inputs(rng, shape, "float32", "C")
    forward = f"dense_{activation}_forward"
    check_kernel(other, forward, lambda: dense_activation_forward_args(forward, x.copy(), W.copy(), b.copy(),
                                                                        np.float32),
                 {"out": fan_in, "pre": fan_in}, magnitudes=dense_magnitudes(x, W, b))
    backward = f"dense_{activation}_backward"
    saved = activation_saved(backward, rng.standard_normal((batch, fan_out))).astype(np.float32)
    scalars = ACTIVATIONS[activation].scalars
    check_kernel(other, backward, lambda: (dout.copy(), saved.copy(), x.copy(), W.copy(), *scalars,
                                           garbage(W.shape, np.float32), garbage(fan_out, np.float32),
                                           garbage(x.shape, np.float32)),
                 {"dW": batch, "db": batch, "dx": fan_out, "dout": 1},
                 magnitudes=dense_activation_backward_magnitudes(backward, dout, saved, x, W))


# --- The dense kernels on any number of threads ----------------------------------------------------------
# The numba backend splits each product into one tile per thread (fastnet/backends/numba_gemm.py), and
# every test above runs on all of them. Here the dense kernels also run on one thread, and at shapes
# where some of two threads get no tile (batch 1, fewer than 16 output columns per thread) or
# tiles of unequal, unaligned sizes.

THREAD_SHAPES = [(1, 1, 1), (1, 70, 33), (2, 5, 10), (33, 17, 47), (129, 40, 31), (7, 3, 130)]


def dense_kernel_cases(shape, dtype, seed=0):
    """(kernel, make_args, reductions, magnitudes) for every dense kernel at `shape`, with dx."""
    batch, fan_in, fan_out = shape
    rng = np.random.default_rng(seed)
    x, W, b, dout = dense_inputs(rng, shape, dtype, "C")
    wide = {name: a.astype(np.float64) for name, a in (("x", x), ("W", W), ("b", b))}
    forward_magnitudes = dense_magnitudes(wide["x"], wide["W"], wide["b"])
    for kernel in ("dense_forward", "dense_relu_forward", *DENSE_ACTIVATION_FORWARD):
        yield (kernel, lambda kernel=kernel: dense_activation_forward_args(kernel, x.copy(), W.copy(), b.copy(), dtype),
               {"out": fan_in, "pre": fan_in}, forward_magnitudes)
    gradients = lambda: (garbage(W.shape, dtype), garbage(fan_out, dtype), garbage(x.shape, dtype))  # noqa: E731
    magnitudes = dense_activation_backward_magnitudes("dense_leaky_relu_backward", dout, np.ones_like(dout), x, W)
    yield ("dense_backward", lambda: (dout.copy(), x.copy(), W.copy(), *gradients()),
           {"dW": batch, "db": batch, "dx": fan_out}, magnitudes)
    relu_out = np.maximum(rng.standard_normal((batch, fan_out)), 0).astype(dtype)
    yield ("dense_relu_backward", lambda: (dout.copy(), relu_out.copy(), x.copy(), W.copy(), *gradients()),
           {"dW": batch, "db": batch, "dx": fan_out, "dout": 1}, magnitudes)
    for kernel in DENSE_ACTIVATION_BACKWARD:
        saved = activation_saved(kernel, rng.standard_normal((batch, fan_out)) * 2).astype(dtype)
        scalars = activation_of(kernel).scalars
        yield (kernel, lambda saved=saved, scalars=scalars: (dout.copy(), saved.copy(), x.copy(), W.copy(), *scalars,
                                                              *gradients()),
               {"dW": batch, "db": batch, "dx": fan_out, "dout": 1},
               dense_activation_backward_magnitudes(kernel, dout, saved, x, W))


@contextlib.contextmanager
def tile_plan(backend, plan):
    """The numba backend cutting its work as `plan` says ('default', or 'finest': a tile per aligned
    block); other backends as they are."""
    if backend != "numba" or plan == "default":
        yield
        return
    from fastnet.backends import numba_gemm
    before = numba_gemm.plan()
    numba_gemm.set_plan(tile_flops=1, pass_elements=1)
    try:
        yield
    finally:
        numba_gemm.set_plan(**before)


@covers("dense_forward", "dense_relu_forward", "dense_backward", "dense_relu_backward", *DENSE_ACTIVATION_FORWARD,
        *DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("plan", ["default", "finest"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_kernels_on_one_thread_and_on_more_threads_than_tiles(other, threads, shape, dtype, plan):
    """At the default plan most of these shapes make fewer tiles than threads; at the finest, every
    aligned block is a tile, of unequal sizes where the width is not a multiple of the block."""
    with backends.use_threads(other, threads), tile_plan(other, plan):
        for kernel, make_args, reductions, magnitudes in dense_kernel_cases(shape, dtype):
            check_kernel(other, kernel, make_args, reductions, f" {shape} on {threads} threads, {plan} plan",
                         magnitudes=magnitudes)


def test_the_dense_kernels_give_the_same_bits_every_time(other):
    """The tiles depend on the shape and the thread count only, and each is summed in a fixed order:
    repeated calls give identical bits, whichever thread ran which tile."""
    for kernel, make_args, _, _ in dense_kernel_cases((129, 300, 200), "float32", seed=1):
        runs = []
        for _ in range(3):
            args = make_args()
            getattr(backends.get(other), kernel)(*args)
            runs.append([a for a in args if isinstance(a, np.ndarray)])
        for run in runs[1:]:
            for got, first in zip(run, runs[0], strict=True):
                assert np.array_equal(got, first, equal_nan=True), f"{other}.{kernel} differs between calls"


# --- bfloat16 operands (--precision bf16) -----------------------------------------------------------------

def special_float32s():
    """float32 bit patterns where rounding to bfloat16 is delicate: every top half with the low halves
    just under, at and just over a tie (odd and even top halves alike), and 20,000 random patterns;
    NaNs (quiet and signalling, both signs), infinities, subnormals and the largest finite values
    are among them."""
    tops = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    random = np.random.default_rng(0).integers(0, 1 << 32, 20_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([(tops[:, None] | lows).ravel(), random]).view(np.float32).reshape(-1, 32)


@covers("round_to_bf16")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_to_bf16_gives_the_references_bits(other, layout):
    """Bit for bit, NaN included (its payload is kept, quieted), in every layout."""
    x = special_float32s()
    check_kernel(other, "round_to_bf16", lambda: (laid_out(x.copy(), layout), np.zeros(x.shape, np.uint16)), {})


@covers("bf16_to_float32")
def test_bf16_to_float32_gives_the_references_values(other):
    """Every one of the 65,536 bfloat16 bit patterns, exactly (NaNs compared by their bits)."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(64, 1024)
    actual, expected = garbage(bits.shape, np.float32), garbage(bits.shape, np.float32)
    for backend, out in ((other, actual), ("numpy", expected)):
        assert_returns(f"{backend}.bf16_to_float32", "bf16_to_float32",
                       backends.get(backend).bf16_to_float32(bits.copy(), out))
    assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(expected.view(np.uint32), bits.astype(np.uint32) << 16)


def bf16_dense_cases(shape, seed=0):
    """dense_kernel_cases with bfloat16 x and W and every optional bf16 output: (kernel, make_args,
    reductions, magnitudes). The tolerances are float32's: the products of bf16 numbers are exact
    in float32, so the backends differ only in the order of their float32 sums."""
    batch, fan_in, fan_out = shape
    rng = np.random.default_rng(seed)
    x, W, b, dout = dense_inputs(rng, shape, np.float32, "C")
    x16, W16 = to_bf16(x), to_bf16(W)
    wide_x, wide_W = bf16_values(x16).astype(np.float64), bf16_values(W16).astype(np.float64)
    magnitudes = dense_magnitudes(wide_x, wide_W, b.astype(np.float64))
    magnitudes["out16"] = magnitudes["out"]
    out16 = lambda: np.zeros((batch, fan_out), np.uint16)  # noqa: E731
    for kernel in ("dense_forward", "dense_relu_forward", *DENSE_ACTIVATION_FORWARD):
        yield (kernel, lambda kernel=kernel: (*dense_activation_forward_args(kernel, x16.copy(), W16.copy(), b.copy(),
                                                                             np.float32), out16()),
               {"out": fan_in, "pre": fan_in, "out16": fan_in}, magnitudes)
    gradients = lambda: (garbage(W.shape, np.float32), garbage(fan_out, np.float32),  # noqa: E731
                         garbage(x.shape, np.float32), out16())
    relu_out = np.maximum(rng.standard_normal((batch, fan_out)), 0).astype(np.float32)
    saved = {"dense_backward": (), "dense_relu_backward": (relu_out,)}
    for kernel in DENSE_ACTIVATION_BACKWARD:
        scalars = activation_of(kernel).scalars
        saved[kernel] = (activation_saved(kernel, rng.standard_normal((batch, fan_out)) * 2).astype(np.float32),)
        saved[kernel] += scalars
    for kernel, extra in saved.items():
        # dense_backward and the ReLU's scale dout by 1 at most, as a leaky ReLU with output 1 does.
        masked = kernel in ("dense_backward", "dense_relu_backward")
        backward_magnitudes = dense_activation_backward_magnitudes(
            "dense_leaky_relu_backward" if masked else kernel, dout, np.ones_like(dout) if masked else extra[0],
            wide_x, wide_W)
        backward_magnitudes["dout16"] = backward_magnitudes["dout"]
        # dense_<act>_backward(dout, saved, x, W, [slope,] dW, db, dx, dout16)
        yield (kernel, lambda extra=extra: (dout.copy(), *extra[:1], x16.copy(), W16.copy(), *extra[1:],
                                            *gradients()),
               {"dW": batch, "db": batch, "dx": fan_out, "dout": 1, "dout16": 1}, backward_magnitudes)


def assert_bf16_copies_are_roundings(kernel, args):
    """Within one backend's call: out16 (dout16) is exactly the rounding of out (dout)."""
    names = list(inspect.signature(getattr(ref, kernel)).parameters)
    given = dict(zip(names, args, strict=True))
    for copy, original in (("out16", "out"), ("dout16", "dout")):
        if copy in given:
            assert np.array_equal(given[copy], to_bf16(given[original])), f"{kernel}: {copy} is not {original} rounded"


@covers("dense_forward", "dense_relu_forward", "dense_backward", "dense_relu_backward", *DENSE_ACTIVATION_FORWARD,
        *DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THREAD_SHAPES + [(128, 3072, 512), (64, 128, 10)])
def test_dense_kernels_with_bf16_operands(other, threads, shape):
    """Every dense kernel on bfloat16 x and W, writing its bf16 output (forward) or upstream gradient
    (backward), against numpy's emulation, on one and two threads.

    A backward kernel's products read its own dout16, and where the two backends' float32 douts
    straddle a bf16 rounding boundary their dout16 differ by one ulp. So dW and dx are checked
    against the float64 products of the backend's own dout16 (to float32's tolerance), and dout16
    against numpy's to one ulp: a kernel that multiplied dout instead, or a stale dout16, fails the
    first; a dout16 that was not dout rounded fails assert_bf16_copies_are_roundings."""
    with backends.use_threads(other, threads):
        for kernel, make_args, reductions, magnitudes in bf16_dense_cases(shape):
            actual, expected = make_args(), make_args()
            getattr(ref, kernel)(*expected)
            getattr(backends.get(other), kernel)(*actual)
            assert_bf16_copies_are_roundings(kernel, expected)
            assert_bf16_copies_are_roundings(kernel, actual)
            what = f" bf16 {shape} on {threads} threads"
            if not kernel.endswith("backward"):
                check_kernel(other, kernel, make_args, reductions, what, magnitudes=magnitudes)
                continue
            got = dict(zip(inspect.signature(getattr(ref, kernel)).parameters, actual, strict=True))
            want = dict(zip(inspect.signature(getattr(ref, kernel)).parameters, expected, strict=True))
            for name in ("dout", "db", "dout16"):
                assert_matches(got[name], want[name], reductions[name], f"{other}.{kernel}{what}: {name}",
                               magnitudes[name])
            own = bf16_values(got["dout16"]).astype(np.float64)
            x64, W64 = (bf16_values(got[name]).astype(np.float64) for name in ("x", "W"))
            for name, exact in (("dW", x64.T @ own), ("dx", own @ W64.T)):
                assert_matches(got[name], exact.astype(np.float32), reductions[name],
                               f"{other}.{kernel}{what}: {name} against its own dout16", magnitudes[name])


@covers(*ELEMENTWISE_FORWARD, "dropout")
@pytest.mark.parametrize("kernel", [*ELEMENTWISE_FORWARD, "dropout"])
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (128, 512)])
def test_activations_and_dropout_write_the_bf16_copy_of_their_output(other, kernel, shape):
    """The kernels that end a hidden layer after layer norm or dropout, with out16."""
    rng = np.random.default_rng(shape[0])
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    uniform = rng.random(shape, np.float32)

    def make_args():
        middle = (uniform.copy(), 0.3) if kernel == "dropout" else ELEMENTWISE_FORWARD[kernel]
        return x.copy(), *middle, garbage(shape, np.float32), np.zeros(shape, np.uint16)

    actual, expected = make_args(), make_args()
    getattr(ref, kernel)(*expected)
    getattr(backends.get(other), kernel)(*actual)
    for args in (actual, expected):
        assert np.array_equal(args[-1], to_bf16(args[-2])), f"{kernel}: out16 is not out rounded"
    check_kernel(other, kernel, make_args, {"out": 1, "out16": 1}, f" bf16 {shape}",
                 magnitudes={"out": slope_error_scale(kernel, x) * np.abs(x)})


def test_the_reference_multiplies_bf16_operands_as_their_exact_values():
    """numpy's emulation against an independent computation: the float64 product of the bf16
    numbers' values (float32 sums, so float32_tol), and not the product of the unrounded inputs."""
    rng = np.random.default_rng(3)
    x, W = rng.standard_normal((33, 300)).astype(np.float32), rng.standard_normal((300, 17)).astype(np.float32)
    x16, W16 = to_bf16(x), to_bf16(W)
    exact = bf16_values(x16).astype(np.float64) @ bf16_values(W16).astype(np.float64)
    out = garbage((33, 17), np.float32)
    ref.dense_forward(x16, W16, np.zeros(17, np.float32), out)
    magnitude = np.abs(bf16_values(x16)).astype(np.float64) @ np.abs(bf16_values(W16)).astype(np.float64)
    assert_close(out, exact.astype(np.float32), rtol=0, atol=float32_tol(300) * magnitude.max())
    unrounded = x.astype(np.float64) @ W.astype(np.float64)
    assert np.abs(out - unrounded).max() > 10 * float32_tol(300) * magnitude.max()


@covers("layernorm_forward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans())
@example(shape=(1, 1), seed=0, in_place=False)  # a single feature: variance 0, xhat 0
@example(shape=(3, 70), seed=0, in_place=True)
def test_layernorm_forward(other, layout, dtype, shape, seed, in_place):
    batch, width = shape

    def make_args():
        rng = np.random.default_rng(seed)
        # Rows of different offsets and spreads, the offset at most a few spreads (as after a dense layer).
        x = rng.standard_normal(shape) * rng.uniform(0.5, 3, (batch, 1)) + rng.uniform(-2, 2, (batch, 1))
        x = laid_out(x.astype(dtype), layout, axis=1)
        gain = laid_out(rng.uniform(0.5, 1.5, width).astype(dtype), layout)
        bias = laid_out(rng.standard_normal(width).astype(dtype), layout)
        return (x, gain, bias, 1e-5, garbage(shape, dtype), garbage(batch, dtype),
                x if in_place else garbage(shape, dtype))

    reductions = {"xhat": width, "inv_std": width, "out": width}
    if in_place:
        reductions["x"] = width
    # xhat = (x - mean) / std cancels when a row's spread is small beside its offset: its rounding
    # error is that of the terms, x / std and mean / std, not of the result (seed 26, (26, 3) has a
    # row [2.04, 1.87, 1.98]).
    x, gain, bias = (a.astype(np.float64) for a in make_args()[:3])
    inv_std = 1 / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)
    terms = (np.abs(x) + np.abs(x.mean(axis=1, keepdims=True))) * inv_std
    out_terms = terms * np.abs(gain) + np.abs(bias)
    check_kernel(other, "layernorm_forward", make_args, reductions, f" {layout} {shape} in_place={in_place}",
                 magnitudes={"xhat": terms, "out": out_terms, "x": out_terms})


@covers("layernorm_backward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans())
@example(shape=(1, 1), seed=0, in_place=True)
def test_layernorm_backward(other, layout, dtype, shape, seed, in_place):
    batch, width = shape

    def arrays(rng):
        x = rng.standard_normal(shape) * rng.uniform(0.5, 3, (batch, 1))
        mean, std = x.mean(axis=1, keepdims=True), np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)
        return rng.standard_normal(shape), (x - mean) / std, 1 / std[:, 0], rng.uniform(0.5, 1.5, width)

    def make_args():
        dout, xhat, inv_std, gain = arrays(np.random.default_rng(seed))
        dout = laid_out(dout.astype(dtype), layout, axis=1)
        return (dout, laid_out(xhat.astype(dtype), layout, axis=0), laid_out(inv_std.astype(dtype), layout),
                laid_out(gain.astype(dtype), layout), garbage(width, dtype), garbage(width, dtype),
                dout if in_place else garbage(shape, dtype))

    # The terms of each result: dx subtracts the row means of g = dout * gain and of g * xhat from g.
    dout, xhat, inv_std, gain = (np.abs(a) for a in arrays(np.random.default_rng(seed)))
    g = dout * gain
    dx_terms = inv_std[:, None] * (g + g.mean(axis=1, keepdims=True) + xhat * (g * xhat).mean(axis=1, keepdims=True))
    magnitudes = {"dgain": (dout * xhat).sum(axis=0), "dbias": dout.sum(axis=0), "dx": dx_terms, "dout": dx_terms}
    reductions = {"dgain": batch, "dbias": batch, "dx": width}
    if in_place:
        reductions["dout"] = width
    check_kernel(other, "layernorm_backward", make_args, reductions, f" {layout} {shape} in_place={in_place}",
                 magnitudes=magnitudes)


@covers("draw_uniform")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), key=st.integers(0, 2**64 - 1), first_row=st.integers(0, 300))
@example(shape=(1, 1), key=2**64 - 1, first_row=0)  # key + n * gamma wraps around at once
def test_draw_uniform(other, layout, dtype, shape, key, first_row):
    def make_args():
        return np.uint64(key), first_row, laid_out(garbage(shape, dtype), layout, axis=0)

    # Integer arithmetic, then one exact conversion and scaling: the same bits.
    check_kernel(other, "draw_uniform", make_args, {}, f" {layout} {shape} key={key} first_row={first_row}")


@covers("dropout")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans(), rate=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
@example(shape=(1, 1), seed=0, in_place=True, rate=0.5)
def test_dropout(other, layout, dtype, shape, seed, in_place, rate):
    def make_args():
        rng = np.random.default_rng(seed)
        x = laid_out(rng.standard_normal(shape).astype(dtype), layout, axis=1)
        # Multiples of 0.1 make ties with the rate: a unit whose number equals the rate is kept.
        uniform = laid_out((rng.integers(0, 10, shape) / 10).astype(dtype), layout, axis=0)
        return x, uniform, rate, x if in_place else garbage(shape, dtype)

    # One multiplication per element, in the same order: exact.
    check_kernel(other, "dropout", make_args, {}, f" {layout} {shape} rate={rate} in_place={in_place}")


# --- Loss ---------------------------------------------------------------------------------------------

@covers("softmax_cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, magnitude=st.sampled_from([1.0, 30.0, 1e4]))
@example(shape=(5, 1), seed=0, magnitude=1.0)   # one class: loss 0, gradient 0
@example(shape=(1, 10), seed=0, magnitude=1e4)  # logits of +-1e4 overflow a naive exp
def test_softmax_cross_entropy(other, dtype, shape, seed, magnitude):
    batch, classes = shape

    def make_args():
        rng = np.random.default_rng(seed)
        logits = (rng.uniform(-1, 1, shape) * magnitude).astype(dtype)
        return logits, rng.integers(0, classes, batch, dtype=np.int64), garbage(shape, dtype)

    loss, expected = check_kernel(other, "softmax_cross_entropy", make_args, {"dlogits": classes},
                                  f" {shape} |logits| <= {magnitude:g}")
    assert_loss_matches(loss, expected, dtype, f"{other}.softmax_cross_entropy loss, {shape} {dtype}")
    assert math.isfinite(loss)


@covers("softmax_cross_entropy_smoothed")
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, magnitude=st.sampled_from([1.0, 30.0, 1e4]),
       smoothing=st.sampled_from([0.0, 0.1, 0.5]))
@example(shape=(5, 1), seed=0, magnitude=1.0, smoothing=0.1)   # one class: loss 0, gradient 0
@example(shape=(1, 10), seed=0, magnitude=1e4, smoothing=0.1)  # logits of +-1e4 overflow a naive exp
def test_softmax_cross_entropy_smoothed(other, dtype, shape, seed, magnitude, smoothing):
    batch, classes = shape

    def make_args():
        rng = np.random.default_rng(seed)
        logits = (rng.uniform(-1, 1, shape) * magnitude).astype(dtype)
        return logits, rng.integers(0, classes, batch, dtype=np.int64), smoothing, garbage(shape, dtype)

    loss, expected = check_kernel(other, "softmax_cross_entropy_smoothed", make_args, {"dlogits": classes},
                                  f" {shape} |logits| <= {magnitude:g} smoothing {smoothing}")
    # The smoothed loss adds the row's mean logit, a sum of K terms of the logits' magnitude.
    tol = (1e-6 if dtype == "float32" else 1e-12) * max(1.0, smoothing * magnitude)
    assert type(loss) is float
    assert loss == pytest.approx(expected, rel=tol, abs=tol), f"{other}.softmax_cross_entropy_smoothed loss"
    assert math.isfinite(loss)


@covers("count_correct")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds)
@example(shape=(1, 1), seed=0)
def test_count_correct(other, dtype, ties, shape, seed):
    batch, classes = shape

    def make_args():
        rng = np.random.default_rng(seed)
        # Random floats have no ties; small integers have many, which argmax breaks towards the
        # first largest, and docs/architecture.md promises the backends agree.
        logits = rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)
        labels = rng.integers(0, classes, batch, dtype=np.int64)
        hits = rng.random(batch) < 0.5  # about half the rows predicted right
        labels[hits] = logits[hits].argmax(axis=1)
        return logits.astype(dtype), labels

    actual, expected = check_kernel(other, "count_correct", make_args, {}, f" {shape} ties={ties}")
    assert type(actual) is int and actual == expected, f"{other}.count_correct: {actual!r} != {expected}"


@covers("sum_of_squares")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.one_of(st.tuples(dims), st.tuples(dims, dims)), seed=seeds)
@example(shape=(1,), seed=0)
def test_sum_of_squares(other, layout, dtype, shape, seed):
    def make_args():
        return (laid_out(np.random.default_rng(seed).standard_normal(shape).astype(dtype), layout),)

    actual, expected = check_kernel(other, "sum_of_squares", make_args, {}, f" {layout} {shape}")
    assert type(actual) is float
    size = math.prod(shape)
    rtol = FLOAT64_TOL if dtype == "float64" else float32_tol(size)
    assert actual == pytest.approx(expected, rel=rtol), f"{other}.sum_of_squares {shape} {dtype}"


# --- Optimizer steps ----------------------------------------------------------------------------------

# kernel: (its state arrays, its hyperparameters after lr at the Optimizer's defaults), from the
# update rules' descriptions
OPTIMIZER_KERNELS = {rule.kernel: (rule.state,
                                   tuple(getattr(Optimizer([], kind), name) for name in rule.hyperparameters))
                     for kind, rule in UPDATE_RULES.items()}
STEPS = 5


@covers(*OPTIMIZER_KERNELS)
@pytest.mark.parametrize("kernel", list(OPTIMIZER_KERNELS))
@pytest.mark.parametrize("grad_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.one_of(st.tuples(dims), st.tuples(dims, dims)), seed=seeds,
       weight_decay=st.sampled_from([0.0, 0.05]))
@example(shape=(1,), seed=0, weight_decay=0.05)
@example(shape=(70, 1), seed=0, weight_decay=0.0)
def test_optimizer_steps(other, kernel, grad_layout, dtype, shape, seed, weight_decay):
    """Five consecutive steps (adam's step counter 1..5) on a weight matrix or a bias, each with a new
    gradient in the given layout; params and state are C-contiguous, as the model and the optimizer
    allocate them. After every step the parameter and every state array must match numpy's."""
    state_names, hyper = OPTIMIZER_KERNELS[kernel]
    lr = 0.01 if kernel.startswith("adam") else 0.1
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(shape).astype(dtype)
    # Nonzero state from the start, so a kernel that ignored it would show at step 1.
    state = [rng.standard_normal(shape).astype(dtype) * 0.1 for _ in state_names]
    if kernel.startswith("adam"):
        state[1] = np.abs(state[1])  # the second moment is never negative
    mine = [param.copy(), *(s.copy() for s in state)]
    theirs = [param.copy(), *(s.copy() for s in state)]

    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(shape).astype(dtype)
        tail = (lr, *hyper, weight_decay) + ((step,) if kernel.startswith("adam") else ())
        for arrays, backend in ((mine, other), (theirs, "numpy")):
            laid_out_grad = laid_out(grad.copy(), grad_layout)
            result = getattr(backends.get(backend), kernel)(arrays[0], laid_out_grad, *arrays[1:], *tail)
            assert_returns(f"{backend}.{kernel}", kernel, result)
            assert np.array_equal(laid_out_grad, grad), f"{backend}.{kernel} changed its grad"
        # Each step rounds a few times per element and the errors of successive steps add up.
        for name, got, want in zip(("param", *state_names), mine, theirs, strict=True):
            assert_matches(got, want, 4 * step, f"{other}.{kernel} {name} after step {step} "
                           f"(grad {grad_layout}, weight_decay {weight_decay})")


@pytest.mark.parametrize("kernel", list(OPTIMIZER_KERNELS))
@pytest.mark.parametrize("shape", [(1,), (70, 33), (3, 1)])
def test_optimizer_steps_write_the_bf16_copy_of_the_updated_parameter(other, kernel, shape):
    """With param16, the same update as without it, and param16 the exact rounding of the new
    parameter, on both backends; the copy starts as garbage, so a kernel that skipped it shows."""
    state_names, hyper = OPTIMIZER_KERNELS[kernel]
    rng = np.random.default_rng(len(shape))
    param, grad = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    state = [np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.1 for _ in state_names]
    tail = (0.01, *hyper, 0.05) + ((3,) if kernel.startswith("adam") else ())
    results = {}
    for backend in ("numpy", other):
        for with_copy in (False, True):
            arrays = [param.copy(), *(s.copy() for s in state)]
            copy = (np.full(shape, 0x7FC1, np.uint16),) if with_copy else ()
            getattr(backends.get(backend), kernel)(arrays[0], grad.copy(), *arrays[1:], *tail, *copy)
            results[backend, with_copy] = arrays, copy
    for backend in ("numpy", other):
        (plain, _), (copied, (copy,)) = results[backend, False], results[backend, True]
        for got, want in zip(copied, plain, strict=True):
            assert np.array_equal(got, want), f"{backend}.{kernel}: param16 changed the update"
        assert np.array_equal(copy, to_bf16(copied[0])), f"{backend}.{kernel}: param16 is not the new param rounded"
    for got, want in zip(results[other, True][0], results["numpy", True][0], strict=True):
        assert_matches(got, want, 4, f"{other}.{kernel} with param16")


@pytest.mark.parametrize("kernel", list(OPTIMIZER_KERNELS))
def test_optimizer_steps_give_the_same_bits_on_any_threads_and_plan(other, kernel):
    """The numba backend's updates run in runs of the flat parameter claimed by whichever thread is
    free: on 1 and 2 threads, at the default plan and at the finest (a run per 16 elements, the last
    shorter), the parameter, its state and its bf16 copy come out bit for bit the same."""
    state_names, hyper = OPTIMIZER_KERNELS[kernel]
    rng = np.random.default_rng(7)
    shape = (77, 13)  # 1,001 elements: 63 runs of 16 at the finest plan, the last of 9
    param, grad = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    state = [np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.1 for _ in state_names]
    tail = (0.01, *hyper, 0.05) + ((3,) if kernel.startswith("adam") else ())
    outcomes = []
    for threads, plan in ((1, "default"), (2, "default"), (1, "finest"), (2, "finest")):
        arrays, copy = [param.copy(), *(s.copy() for s in state)], np.full(shape, 0x7FC1, np.uint16)
        with backends.use_threads(other, threads), tile_plan(other, plan):
            getattr(backends.get(other), kernel)(arrays[0], grad.copy(), *arrays[1:], *tail, copy)
        outcomes.append([a.tobytes() for a in (*arrays, copy)])
    assert all(outcome == outcomes[0] for outcome in outcomes[1:]), f"{other}.{kernel} depends on its threads"


# --- Whole models -------------------------------------------------------------------------------------

def model_tolerance(dtype, sizes, batch):
    """Relative tolerance for a model's loss gradients: each layer's forward and backward sums add
    their rounding, so the float32 tolerances of the layers' reductions add up."""
    if np.dtype(dtype) == np.float64:
        return FLOAT64_TOL
    return sum(float32_tol(k) for k in (*sizes, batch))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes, batch", [([7, 5, 3], 4), ([48, 32, 16, 3], 16), ([3072, 64, 10], 1),
                                          ([20, 1, 4], 9)])
def test_loss_and_grads_match_numpy(other, dtype, sizes, batch):
    rng = np.random.default_rng(len(sizes) + batch)
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], batch)
    expected_loss, expected = MLP(sizes, backend="numpy", dtype=dtype, seed=4).loss_and_grads(x, y)
    loss, grads = MLP(sizes, backend=other, dtype=dtype, seed=4).loss_and_grads(x, y)
    assert_loss_matches(loss, expected_loss, dtype, f"{other} MLP{sizes} loss")
    rtol = model_tolerance(dtype, sizes, batch)
    for got, want in zip(grads, expected, strict=True):
        scale = float(np.abs(want).max())
        assert_close(got, want, rtol=rtol, atol=rtol * scale)


REGULARISED_SPECS = [  # (MLP keyword arguments, label smoothing): every activation, norm, dropout
    (dict(activation="leaky_relu"), 0.0),
    (dict(activation="tanh", dropout=0.3), 0.1),
    (dict(activation="gelu", norm="layernorm"), 0.0),
    (dict(activation="relu", norm="layernorm", dropout=0.2), 0.1),
    (dict(activation="gelu", dropout=0.5), 0.2),
    (dict(activation="tanh", norm="layernorm", dropout=0.1), 0.0),
    (dict(activation="leaky_relu", norm="layernorm", dropout=0.1), 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec, smoothing", REGULARISED_SPECS)
@pytest.mark.parametrize("sizes, batch", [([48, 32, 16, 3], 16), ([20, 1, 4], 9), ([7, 5, 3], 1)])
def test_regularised_loss_and_grads_match_numpy(other, dtype, spec, smoothing, sizes, batch):
    """A training pass (dropout masks from a generator of one seed) of every kind of layer. Layer norm
    adds a sum over each layer's width to the forward and backward sums; the tolerance doubles for it."""
    rng = np.random.default_rng(len(sizes) + batch)
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], batch)
    results = [MLP(sizes, backend=backend, dtype=dtype, seed=4, **spec).loss_and_grads(
        x, y, rng=np.random.default_rng(5), label_smoothing=smoothing) for backend in ("numpy", other)]
    (expected_loss, expected), (loss, grads) = results
    assert_loss_matches(loss, expected_loss, dtype, f"{other} MLP{sizes} {spec} loss")
    rtol = 2 * model_tolerance(dtype, sizes, batch)
    for got, want in zip(grads, expected, strict=True):
        scale = float(np.abs(want).max())
        assert_close(got, want, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 3-class npy dataset of 4x4x3 uint8 images (48 inputs): each class a brightness level under
    enough noise that a small network gets most, not all, of them right. 632 training images make 40
    batches of 16 per epoch (the last one of 8, so a second workspace is used too)."""
    return save_brightness_classes(tmp_path_factory.mktemp("synthetic"), np.random.default_rng(1),
                                   {"train": 632, "test": 300}, side=4, step=30, base=100, noise=70)


SYNTHETIC_RUN = dict(hidden=(32, 16), epochs=5, batch_size=16, optimizer="nesterov", weight_decay=5e-3,
                     lr=0.05, seed=3)  # 5 epochs of 40 steps: 200 steps


def train_run(data, backend, out):
    """Train on `data` with `backend` into `out`; returns (params and optimizer state, per-epoch metrics)."""
    train(TrainConfig(data=str(data), backend=backend, out=str(out), **SYNTHETIC_RUN), log=lambda line: None)
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files if name.startswith(("param_", "optim_"))}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return arrays, metrics


@pytest.fixture(scope="module")
def numpy_run(synthetic, tmp_path_factory):
    return train_run(synthetic, "numpy", tmp_path_factory.mktemp("numpy-run"))


def test_200_training_steps_match_numpy(other, synthetic, numpy_run, tmp_path):
    """The same seed on both backends: parameters, optimizer state and every epoch's metrics agree.

    Rounding differences of one step feed into the next, so they grow over 200 steps, but training
    is contracting here rather than chaotic (weight decay, a decaying learning rate): they stay
    around 1e-6 of the parameters' scale (measured: 6e-7 for numba, and for a backend whose GEMMs
    round once from float64). rtol 1e-4 with atol 1e-4 times the largest |value| of each
    array leaves two orders of magnitude for that drift, and still fails at once if one kernel is
    off by a fraction of a percent, or if one step's update is missing.
    """
    expected_arrays, expected_metrics = numpy_run
    arrays, metrics = train_run(synthetic, other, tmp_path)
    assert sorted(arrays) == sorted(expected_arrays)
    assert "param_5" in arrays and "optim_velocity_5" in arrays
    assert int(arrays["optim_steps_taken"]) == 200
    for name, want in expected_arrays.items():
        scale = float(np.abs(want).max())
        assert_close(arrays[name], want, rtol=1e-4, atol=1e-4 * scale)

    assert len(metrics) == len(expected_metrics) == SYNTHETIC_RUN["epochs"]
    for got, want in zip(metrics, expected_metrics, strict=True):
        assert got["epoch"] == want["epoch"] and got["lr"] == want["lr"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
        # A prediction flips only for an image within rounding of the decision boundary: one at most.
        assert abs(got["train_acc"] - want["train_acc"]) * 632 <= 1 + 1e-9, (got, want)
        assert abs(got["test_acc"] - want["test_acc"]) * 300 <= 1 + 1e-9, (got, want)
    # The run learned something, so the comparison above is of a real training run.
    assert 0.6 < expected_metrics[-1]["test_acc"] < 1


def test_same_seed_and_backend_give_bit_identical_runs(other, synthetic, tmp_path):
    first, first_metrics = train_run(synthetic, other, tmp_path / "first")
    second, second_metrics = train_run(synthetic, other, tmp_path / "second")
    assert sorted(first) == sorted(second)
    for name in first:
        assert np.array_equal(first[name], second[name]), f"{name} differs between two runs of {other}"
    for a, b in zip(first_metrics, second_metrics, strict=True):
        assert ({k: v for k, v in a.items() if k not in TIMING_METRICS}
                == {k: v for k, v in b.items() if k not in TIMING_METRICS})


def test_one_two_and_three_threads_give_the_same_bits(other, synthetic, tmp_path):
    """The tiles depend on the shapes and the plan alone, so a run's numbers do not depend on how many
    threads claim them: three threads on two cores (NUMBA_NUM_THREADS=3), with a plan that cuts every
    product and pass into many tiles of unequal sizes, dropout and flips drawing on the way."""
    runs = {}
    for threads in (1, 2, 3):
        out = tmp_path / f"threads{threads}"
        result = fastnet_cli("train", "--data", synthetic, "--backend", other, "--threads", threads, "--epochs", 2,
                             "--hidden", "100,37", "--batch-size", 50, "--dropout", 0.2, "--flip", "--seed", 4,
                             "--out", out,
                             env={"NUMBA_NUM_THREADS": "3", "FASTNET_PLAN": "tile_flops=1000,pass_elements=100"})
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["parallelism"]["threads"] == threads
        with np.load(out / "model.npz") as saved:
            runs[threads] = {name: saved[name] for name in saved.files if name.startswith("param_")}
        lines = (out / "metrics.jsonl").read_text().splitlines()
        runs[threads]["metrics"] = np.array([[m["train_loss"], m["test_loss"]] for m in map(json.loads, lines)])
    for threads in (2, 3):
        for name, value in runs[1].items():
            assert np.array_equal(runs[threads][name], value), f"{name} differs between 1 and {threads} threads"


def fastnet_cli(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "fastnet", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=900)


def cli_test_accuracy(backend, out):
    result = fastnet_cli("train", "--data", real_data_path(), "--epochs", 2, "--backend", backend, "--out", out)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == backend
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]


@pytest.fixture(scope="module")
def numpy_cifar_accuracy(tmp_path_factory):
    return cli_test_accuracy("numpy", tmp_path_factory.mktemp("cifar-numpy"))


@pytest.mark.cifar
def test_cli_run_on_real_cifar_matches_numpy(other, numpy_cifar_accuracy, tmp_path):
    """The default network for 2 epochs on the real CIFAR-10: test accuracies within 0.5 points. Over
    two full epochs float32 rounding differences decorrelate individual predictions near the
    boundary but cannot move the accuracy by 50 of the 10,000 test images."""
    accuracy = cli_test_accuracy(other, tmp_path / "run")
    assert numpy_cifar_accuracy > 0.35, "the numpy run did not learn"
    assert abs(accuracy - numpy_cifar_accuracy) <= 0.005, (accuracy, numpy_cifar_accuracy)


# --- No allocation per step ---------------------------------------------------------------------------

# One input buffer is ALLOCATION_BATCH x 512 float32 = 128 KB; a step that allocated any buffer of the
# model would go far past the threshold, while Python's own small objects (floats, views, the
# arguments of calls) stay well below it.
@pytest.mark.parametrize("spec, smoothing", [(dict(), 0.0), *REGULARISED_SPECS])
@pytest.mark.parametrize("sizes, batch", [([48, 32, 16, 3], 16), ([20, 1, 4], 9), ([300, 40, 10], 1)])
def test_bf16_loss_and_grads_match_numpy(other, spec, smoothing, sizes, batch):
    """Mixed precision through every kind of layer, against numpy's emulation. The products of bf16
    numbers are exact in float32, so the tolerance is float32's, as in the test above; it holds as
    long as no activation of one backend rounds to a different bf16 number than the other's, which
    at these fixed inputs none does."""
    rng = np.random.default_rng(len(sizes) + batch)
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], batch)
    results = [MLP(sizes, backend=backend, seed=4, precision="bf16", **spec).loss_and_grads(
        x, y, rng=np.random.default_rng(5), label_smoothing=smoothing) for backend in ("numpy", other)]
    (expected_loss, expected), (loss, grads) = results
    assert_loss_matches(loss, expected_loss, "float32", f"{other} bf16 MLP{sizes} {spec} loss")
    rtol = 2 * model_tolerance("float32", sizes, batch)
    for got, want in zip(grads, expected, strict=True):
        scale = float(np.abs(want).max())
        assert_close(got, want, rtol=rtol, atol=rtol * scale)


ALLOCATION_SIZES = [512, 256, 64, 10]
ALLOCATION_BATCH = 64
ALLOCATION_THRESHOLD = 16 * 1024


def training_step(net, optimizer, images, labels, batch, shift, scale):
    """The calls that train_epoch makes for one minibatch."""
    k = net.kernels
    ws = net.workspace(len(batch))
    k.gather_normalize(images, batch, shift, scale, ws.inputs)
    np.take(labels, batch, out=ws.labels)
    net.run_forward(ws)
    k.count_correct(ws.logits, ws.labels)
    net.run_backward(ws)
    optimizer.step(ws.grads, 0.01)


def regularised_training_step(net, optimizer, images, labels, batch, shift, scale, augmentation, rng):
    """A training step with everything issue 6 adds: augmentation, dropout, label smoothing and
    gradient clipping (on a network with layer norm and another activation)."""
    k = net.kernels
    ws = net.workspace(len(batch))
    augmentation.apply(k, images, batch, rng, shift, scale, ws.inputs)
    np.take(labels, batch, out=ws.labels)
    net.run_forward(ws, rng)
    k.count_correct(ws.logits, ws.labels)
    net.run_backward(ws, label_smoothing=0.1)
    net.clip_grad_norm(ws.grads, 1.0)
    optimizer.step(ws.grads, 0.01)


ALLOCATION_IMAGE = (16, 16, 2)  # ALLOCATION_SIZES[0] inputs
PROJECTED_IMAGE = (32, 16, 2)  # pixels that a projection takes to ALLOCATION_SIZES[0] inputs
REGULARISED = dict(activation="gelu", dropout=0.2, norm="layernorm")


VARIANTS = ["default", "regularised", "components", "projected", "bf16", "regularised bf16"]


def allocation_setup(backend, variant="default"):
    """A network, its optimizer and 20 training steps of one of six kinds: "default", "regularised"
    (pixel augmentation, dropout, layer norm, label smoothing, clipping), "components" (images
    stored as principal components and flipped by sign, as fastnet train --pca K --flip trains),
    "projected" (pixel augmentation, then a projection, as --pca K --translate N trains), and
    "bf16" and "regularised bf16", the first two in mixed precision."""
    rng = np.random.default_rng(0)
    spec = REGULARISED if variant in ("regularised", "regularised bf16") else {}
    precision = "bf16" if variant.endswith("bf16") else "fp32"
    net = MLP(ALLOCATION_SIZES, backend=backend, seed=rng, precision=precision, **spec)
    optimizer = Optimizer(net.params, "momentum", weight_decay=1e-3, backend=backend, copies=net.param_copies)
    images = rng.integers(0, 256, (8 * ALLOCATION_BATCH, ALLOCATION_SIZES[0]), dtype=np.uint8)
    labels = rng.integers(0, ALLOCATION_SIZES[-1], len(images))
    shift = np.full(ALLOCATION_SIZES[0], 120, np.float32)
    scale = np.full(ALLOCATION_SIZES[0], 1 / 64, np.float32)
    order = rng.permutation(len(images))
    batches = [order[i:i + ALLOCATION_BATCH] for i in range(0, len(order), ALLOCATION_BATCH)]
    augmentation = Augmentation(ALLOCATION_IMAGE, flip=True, translate=2, cutout=4)
    if variant == "components":
        images = rng.standard_normal(images.shape).astype(np.float32)
        shift, scale = np.zeros_like(shift), np.ones_like(scale)
        signs = np.where(rng.random(ALLOCATION_SIZES[0]) < 0.5, -1, 1).astype(np.float32)
        augmentation = ComponentFlip(signs)
    elif variant == "projected":  # the network's inputs are the projection of the augmented pixels
        pixels = int(np.prod(PROJECTED_IMAGE))
        images = rng.integers(0, 256, (len(images), pixels), dtype=np.uint8)
        shift, scale = np.full(pixels, 120, np.float32), np.full(pixels, 1 / 64, np.float32)
        projection = (rng.standard_normal((pixels, ALLOCATION_SIZES[0])) / np.sqrt(pixels)).astype(np.float32)
        augmentation = ProjectedAugmentation(Augmentation(PROJECTED_IMAGE, flip=True, translate=2, cutout=4),
                                             projection)
    if variant not in ("default", "bf16"):
        step = [lambda b=b: regularised_training_step(net, optimizer, images, labels, b, shift, scale,
                                                      augmentation, rng) for b in batches]
    else:
        step = [lambda b=b: training_step(net, optimizer, images, labels, b, shift, scale) for b in batches]
    for s in step[:3]:  # warm-up: compiles, and allocates the workspace
        s()
    return net, optimizer, [step[i % len(step)] for i in range(20)]


def peak_allocation(steps):
    """The peak of memory traced by tracemalloc (which sees NumPy's buffers) over running `steps`."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for s in steps:
            s()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def buffers(net, optimizer):
    ws = net.workspace(ALLOCATION_BATCH)
    arrays = [*net.params, *ws.activations, *ws.deltas[1:], *ws.grads, ws.labels]
    arrays += [a for group in (ws.pre, ws.xhat, ws.inv_std, ws.hidden, ws.uniform) for a in group if a is not None]
    if net.precision == "bf16":
        arrays += [*ws.activations16, *ws.deltas16[1:], *net.weights16]
    return arrays + [a for group in optimizer.state.values() for a in group]


def test_the_allocation_probe_sees_numpys_temporaries():
    """The NumPy backend gathers the batch with fancy indexing, a temporary copy: the probe below
    must see it, or it could not see a backend allocating either."""
    net, optimizer, steps = allocation_setup("numpy")
    assert peak_allocation(steps) > ALLOCATION_THRESHOLD


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_allocates_nothing_after_warm_up(other, variant):
    net, optimizer, steps = allocation_setup(other, variant)
    before = [(a, a.ctypes.data) for a in buffers(net, optimizer)]
    peak = peak_allocation(steps)
    assert peak < ALLOCATION_THRESHOLD, f"{other}: 20 training steps allocated up to {peak} bytes"
    # The same arrays, at the same addresses: nothing was replaced or reallocated.
    after = buffers(net, optimizer)
    assert len(after) == len(before)
    for (array, address), now in zip(before, after, strict=True):
        assert now is array and now.ctypes.data == address
    assert len(net._workspaces) == 1


class NrtAllocationRecorder:
    """Wraps a Numba backend and records, per kernel, the allocations of Numba's runtime (NRT) that a
    call makes beyond those of passing its arguments in. tracemalloc does not see NRT allocations.

    Numba allocates a small header (a MemInfo) for every array argument it receives and frees it on
    return, so `per_array` (measured, see nrt_allocations_per_array_argument) is subtracted.
    """

    def __init__(self, backend, rtsys, per_array):
        self.backend, self.rtsys, self.per_array = backend, rtsys, per_array
        self.extra = {}    # kernel -> NRT allocations beyond the arguments' headers
        self.leaked = {}   # kernel -> NRT allocations not freed on return
        self.calls = 0

    def __getattr__(self, name):
        kernel = getattr(self.backend, name)

        def recorded(*args):
            arrays = sum(isinstance(a, np.ndarray) for a in args)
            before = self.rtsys.get_allocation_stats()
            result = kernel(*args)
            after = self.rtsys.get_allocation_stats()
            allocs, frees = after.alloc - before.alloc, after.free - before.free
            self.calls += 1
            self.extra[name] = self.extra.get(name, 0) + allocs - self.per_array * arrays
            self.leaked[name] = self.leaked.get(name, 0) + allocs - frees
            return result

        return recorded


def nrt_allocations_per_array_argument(rtsys):
    from numba import njit

    @njit
    def takes_three_arrays(a, b, c):
        return None

    arrays = np.zeros(3), np.zeros((2, 2), np.float32), np.zeros(4, np.int64)
    takes_three_arrays(*arrays)  # compile
    before = rtsys.get_allocation_stats().alloc
    takes_three_arrays(*arrays)
    allocs = rtsys.get_allocation_stats().alloc - before
    assert allocs % 3 == 0, allocs
    return allocs // 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_numba_kernels_allocate_no_arrays_in_a_training_step(variant):
    if "numba" not in OTHER_BACKENDS:
        unavailable("the numba backend is not available: pip install numba")
    from numba.core.runtime import _nrt_python, rtsys

    was_enabled = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        net, optimizer, steps = allocation_setup("numba", variant)
        recorder = NrtAllocationRecorder(net.kernels, rtsys, nrt_allocations_per_array_argument(rtsys))
        net.kernels = optimizer.kernels = recorder  # what MLP and Optimizer call their kernels through
        for s in steps:
            s()
    finally:
        if not was_enabled:
            _nrt_python.memsys_disable_stats()
    used = {"default": {"dense_relu_backward", "momentum_step"},
            "bf16": {"round_to_bf16", "dense_relu_forward", "dense_relu_backward", "momentum_step"},
            "regularised bf16": {"round_to_bf16", "layernorm_forward", "gelu_forward", "draw_uniform", "dropout",
                                 "dense_backward", "momentum_step"},
            "regularised": {"augment_gather_normalize", "layernorm_forward", "layernorm_backward", "gelu_forward",
                            "gelu_backward", "draw_uniform", "dropout", "softmax_cross_entropy_smoothed",
                            "sum_of_squares", "momentum_step"},
            "components": {"gather_flip_components", "dense_relu_backward", "momentum_step"},
            "projected": {"augment_gather_normalize", "dense_forward", "dense_relu_backward", "momentum_step"}}[variant]
    assert recorder.calls >= 20 * 12 and set(recorder.extra) >= used
    assert {k: n for k, n in recorder.extra.items() if n} == {}, "kernels allocated arrays (count over 20 steps)"
    assert {k: n for k, n in recorder.leaked.items() if n} == {}, "kernels leaked NRT memory"


# --- Coverage -----------------------------------------------------------------------------------------

def test_every_kernel_has_an_equivalence_test():
    """A kernel added to KERNELS needs a test here that compares it across backends."""
    assert COVERED == set(backends.KERNELS)
