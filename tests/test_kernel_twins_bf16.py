"""bfloat16 (--precision bf16) in the kernels of every backend but numpy, against their NumPy twins:
the rounding and its inverse bit for bit, the dense kernels on bf16 operands writing bf16 copies of
their outputs, and the activations and dropout writing theirs."""

import inspect

import numpy as np
import pytest

from fastnet import backends
from fastnet.backends import numpy_backend as ref
from helpers import (
    DENSE_ACTIVATION_BACKWARD,
    DENSE_ACTIVATION_FORWARD,
    ELEMENTWISE_FORWARD,
    LAYOUTS,
    STRIDED_ON_PURPOSE,
    THREAD_SHAPES,
    activation_of,
    activation_saved,
    assert_matches,
    assert_returns,
    bf16_values,
    check_kernel,
    covers,
    dense_activation_backward_magnitudes,
    dense_activation_forward_args,
    dense_inputs,
    dense_magnitudes,
    every_delicate_float32,
    garbage,
    laid_out,
    slope_error_scale,
    tile_plan,
    to_bf16,
)

pytestmark = STRIDED_ON_PURPOSE


# --- bfloat16 operands (--precision bf16) -----------------------------------------------------------------

def special_float32s():
    """float32 bit patterns where rounding to bfloat16 is delicate: every top half with the low halves
    just under, at and just over a tie (odd and even top halves alike), and 20,000 random patterns;
    NaNs (quiet and signalling, both signs), infinities, subnormals and the largest finite values
    are among them."""
    random = np.random.default_rng(0).integers(0, 1 << 32, 20_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([every_delicate_float32().view(np.uint32), random]).view(np.float32).reshape(-1, 32)


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
@pytest.mark.parametrize("plan", ["default", "finest"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THREAD_SHAPES + [(128, 3072, 512), (64, 128, 10)])
def test_dense_kernels_with_bf16_operands_match_numpys_emulation(other, threads, shape, plan):
    """Every dense kernel on bfloat16 x and W, writing its bf16 output (forward) or upstream gradient
    (backward), against numpy's emulation, on one and two threads, in the plan's tiles (a tile per
    core by default for bf16) and in the finest (a tile per aligned block).

    A backward kernel's products read its own dout16, and where the two backends' float32 douts
    straddle a bf16 rounding boundary their dout16 differ by one ulp. So dW and dx are checked
    against the float64 products of the backend's own dout16 (to float32's tolerance), and dout16
    against numpy's to one ulp: a kernel that multiplied dout instead, or a stale dout16, fails the
    first; a dout16 that was not dout rounded fails assert_bf16_copies_are_roundings."""
    with backends.use_threads(other, threads), tile_plan(other, plan):
        for kernel, make_args, reductions, magnitudes in bf16_dense_cases(shape):
            actual, expected = make_args(), make_args()
            getattr(ref, kernel)(*expected)
            getattr(backends.get(other), kernel)(*actual)
            assert_bf16_copies_are_roundings(kernel, expected)
            assert_bf16_copies_are_roundings(kernel, actual)
            what = f" bf16 {shape} on {threads} threads, {plan} plan"
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
