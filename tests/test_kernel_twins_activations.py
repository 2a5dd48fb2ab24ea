"""The activations (elementwise and fused into a dense layer), layer norm, the dropout numbers and
dropout of every backend but numpy against their NumPy twins, as check_kernel (helpers.py) compares
them."""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastnet.activations import ACTIVATIONS
from helpers import (
    DENSE_ACTIVATION_BACKWARD,
    DENSE_ACTIVATION_FORWARD,
    DTYPES,
    ELEMENTWISE_FORWARD,
    LAYOUTS,
    SETTINGS,
    STRIDED_ON_PURPOSE,
    activation_of,
    activation_saved,
    assert_close,
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
    slope_error_scale,
    with_awkward_shapes,
)

pytestmark = STRIDED_ON_PURPOSE


# --- Other activations, layer norm, dropout -----------------------------------------------------------


# kernel: (what it reads the derivative from, its scalars); relu_backward has a test of its own above
ELEMENTWISE_BACKWARD = {a.backward: ("input" if a.reads_input else "output", a.scalars)
                        for a in ACTIVATIONS.values() if a.name != "relu"}


@covers(*ELEMENTWISE_FORWARD)
@pytest.mark.parametrize("kernel", list(ELEMENTWISE_FORWARD))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans(), magnitude=st.sampled_from([1.0, 10.0]))
@example(shape=(1, 1), seed=0, in_place=True, magnitude=1.0)
def test_activation_forward_matches_numpy(other, kernel, layout, dtype, shape, seed, in_place, magnitude):
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


def test_the_gelu_kernels_exp_is_within_a_float32_ulp_and_the_c_librarys_in_float64(other):
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
def test_activation_backward_matches_numpy(other, kernel, layout, dtype, shape, seed, in_place):
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


@covers(*DENSE_ACTIVATION_FORWARD)
@pytest.mark.parametrize("kernel", DENSE_ACTIVATION_FORWARD)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=seeds)
@with_awkward_shapes()
def test_dense_activation_forward_matches_numpy(other, kernel, layout, dtype, shape, seed):
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
def test_dense_activation_backward_matches_numpy(other, kernel, layout, dtype, shape, seed, with_dx):
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
def test_dense_activation_kernels_match_numpy_at_the_default_networks_shapes(other, activation, shape):
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


# --- Layer norm, dropout -------------------------------------------------------------------------------


@covers("layernorm_forward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, in_place=st.booleans())
@example(shape=(1, 1), seed=0, in_place=False)  # a single feature: variance 0, xhat 0
@example(shape=(3, 70), seed=0, in_place=True)
def test_layernorm_forward_matches_numpy(other, layout, dtype, shape, seed, in_place):
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
def test_layernorm_backward_matches_numpy(other, layout, dtype, shape, seed, in_place):
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
def test_draw_uniform_matches_numpy(other, layout, dtype, shape, key, first_row):
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
def test_dropout_matches_numpy(other, layout, dtype, shape, seed, in_place, rate):
    def make_args():
        rng = np.random.default_rng(seed)
        x = laid_out(rng.standard_normal(shape).astype(dtype), layout, axis=1)
        # Multiples of 0.1 make ties with the rate: a unit whose number equals the rate is kept.
        uniform = laid_out((rng.integers(0, 10, shape) / 10).astype(dtype), layout, axis=0)
        return x, uniform, rate, x if in_place else garbage(shape, dtype)

    # One multiplication per element, in the same order: exact.
    check_kernel(other, "dropout", make_args, {}, f" {layout} {shape} rate={rate} in_place={in_place}")
