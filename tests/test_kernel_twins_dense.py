"""The gather kernels, the dense layers and the ReLU of every backend but numpy against their NumPy
twins (fastnet/backends/numpy_backend.py), at awkward shapes, in C, Fortran and strided layouts, and on
one thread and more threads than tiles. check_kernel (helpers.py) calls each kernel of both backends on
identical arguments and compares every array argument afterwards and the return value."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastnet import backends
from helpers import (
    AWKWARD,
    DENSE_ACTIVATION_BACKWARD,
    DENSE_ACTIVATION_FORWARD,
    DTYPES,
    LAYOUTS,
    SETTINGS,
    STRIDED_ON_PURPOSE,
    THREAD_SHAPES,
    activation_of,
    activation_saved,
    check_kernel,
    covers,
    dense_activation_backward_magnitudes,
    dense_activation_forward_args,
    dense_inputs,
    dense_magnitudes,
    dims,
    garbage,
    laid_out,
    seeds,
    shapes,
    tile_plan,
    to_bf16,
    with_awkward_shapes,
)

pytestmark = STRIDED_ON_PURPOSE


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
def test_gather_normalize_matches_numpy(other, source, dtype, count, batch, width, seed, with16):
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
def test_augment_gather_normalize_matches_numpy(other, source, dtype, count, batch, image, cutout_size, seed, with16):
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
def test_gather_flip_components_matches_numpy(other, dtype, count, batch, width, seed, with16):
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


@covers("dense_forward", "dense_relu_forward")
@pytest.mark.parametrize("kernel", ["dense_forward", "dense_relu_forward"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds)
@with_awkward_shapes()
def test_dense_forward_matches_numpy(other, kernel, layout, dtype, shape, seed):
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
def test_dense_backward_matches_numpy(other, kernel, layout, dtype, shape, seed, with_dx):
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
def test_the_products_hook_matches_numpy(other, layout, dtype, shape, with_dx):
    """`products`, the yardstick fastnet bench holds a step against (a dense layer's three products
    alone), computes what numpy's does, at awkward shapes and the default network's layers."""
    batch, fan_in, fan_out = shape

    def make_args():
        x, W, _, dout = dense_inputs(np.random.default_rng(sum(shape)), shape, dtype, layout)
        return (x, W, dout, garbage((batch, fan_out), dtype), garbage((fan_in, fan_out), dtype),
                garbage((batch, fan_in), dtype) if with_dx else None)

    reductions = {"out": fan_in, "dW": batch, "dx": fan_out}
    check_kernel(other, "products", make_args, reductions, f" {layout} {shape}", linear=True)


@covers("dense_forward", "dense_relu_forward", "dense_backward", "dense_relu_backward")
@pytest.mark.parametrize("shape", [(128, 3072, 512), (128, 512, 10)])
def test_dense_kernels_match_numpy_at_the_default_networks_shapes(other, shape):
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
def test_relu_backward_matches_numpy(other, layout, dtype, shape, seed, in_place):
    def make_args():
        rng = np.random.default_rng(seed)
        dout = laid_out(rng.standard_normal(shape).astype(dtype), layout, axis=1)
        out = laid_out(np.maximum(rng.standard_normal(shape), 0).astype(dtype), layout, axis=0)
        return dout, out, dout if in_place else garbage(shape, dtype)

    # A selection, no arithmetic: exact (reductions empty), including dout when dx is dout.
    check_kernel(other, "relu_backward", make_args, {}, f" {layout} {shape} in_place={in_place}")


# --- The dense kernels on any number of threads ----------------------------------------------------------
# The numba backend splits each product into one tile per thread (fastnet/backends/numba_gemm.py), and
# every test above runs on all of them. Here the dense kernels also run on one thread, and at shapes
# where some of two threads get no tile (batch 1, fewer than 16 output columns per thread) or
# tiles of unequal, unaligned sizes.


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


@covers("dense_forward", "dense_relu_forward", "dense_backward", "dense_relu_backward", *DENSE_ACTIVATION_FORWARD,
        *DENSE_ACTIVATION_BACKWARD)
@pytest.mark.parametrize("plan", ["default", "finest"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_kernels_match_numpy_on_one_thread_and_on_more_threads_than_tiles(other, threads, shape, dtype, plan):
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
