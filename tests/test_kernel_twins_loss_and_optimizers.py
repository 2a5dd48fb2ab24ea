"""The loss, accuracy and norm kernels, the optimizers' update steps and the weight average's of every
backend but numpy against their NumPy twins, as check_kernel (helpers.py) compares them."""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastnet import backends
from fastnet.optim import UPDATE_RULES, Optimizer
from helpers import (
    DTYPES,
    FLOAT64_TOL,
    LAYOUTS,
    SETTINGS,
    STRIDED_ON_PURPOSE,
    assert_loss_matches,
    assert_matches,
    assert_returns,
    check_kernel,
    covers,
    dims,
    float32_tol,
    garbage,
    laid_out,
    seeds,
    tile_plan,
    to_bf16,
)

pytestmark = STRIDED_ON_PURPOSE


# --- Loss ---------------------------------------------------------------------------------------------

@covers("softmax_cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.tuples(dims, dims), seed=seeds, magnitude=st.sampled_from([1.0, 30.0, 1e4]))
@example(shape=(5, 1), seed=0, magnitude=1.0)   # one class: loss 0, gradient 0
@example(shape=(1, 10), seed=0, magnitude=1e4)  # logits of +-1e4 overflow a naive exp
def test_softmax_cross_entropy_matches_numpy(other, dtype, shape, seed, magnitude):
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
def test_softmax_cross_entropy_smoothed_matches_numpy(other, dtype, shape, seed, magnitude, smoothing):
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
def test_count_correct_matches_numpy(other, dtype, ties, shape, seed):
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
def test_sum_of_squares_matches_numpy(other, layout, dtype, shape, seed):
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
def test_optimizer_steps_match_numpy(other, kernel, grad_layout, dtype, shape, seed, weight_decay):
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


# --- Weight averaging ---------------------------------------------------------------------------------

@covers("ema_update")
@pytest.mark.parametrize("param_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.one_of(st.tuples(dims), st.tuples(dims, dims)), seed=seeds,
       decay=st.sampled_from([2 / 11, 0.5, 0.9, 0.9998]))
@example(shape=(1,), seed=0, decay=0.9998)
@example(shape=(71,), seed=0, decay=0.5)
@example(shape=(33, 17), seed=0, decay=2 / 11)  # step 1's warmed-up decay
def test_ema_update_matches_numpy(other, param_layout, dtype, shape, seed, decay):
    """One step of the average, on a weight matrix or a bias, the parameter in the given layout (the
    average is C-contiguous, as the WeightAverage allocates it): the average must match numpy's and the
    parameter be left alone."""
    def make_args():
        rng = np.random.default_rng(seed)
        average = rng.standard_normal(shape).astype(dtype)
        return average, laid_out(rng.standard_normal(shape).astype(dtype), param_layout), decay

    check_kernel(other, "ema_update", make_args, {"average": 1}, f" {param_layout} {shape} decay {decay}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpys_ema_update_is_the_moving_average(dtype):
    """The reference against the formula, average = decay * average + (1 - decay) * param, in float64
    here: to within the rounding of the average's dtype."""
    rng = np.random.default_rng(3)
    average, param = rng.standard_normal((9, 5)).astype(dtype), rng.standard_normal((9, 5)).astype(dtype)
    expected = 0.9 * average.astype(np.float64) + 0.1 * param.astype(np.float64)
    kept = param.copy()
    backends.get("numpy").ema_update(average, param, 0.9)
    assert average.dtype == np.dtype(dtype) and np.array_equal(param, kept)
    assert_matches(average, expected.astype(dtype), 2, f"numpy.ema_update {dtype}")


def test_ema_update_gives_the_same_bits_on_any_threads_and_plan(other):
    """The numba backend averages in the optimizers' runs of the flat parameter: on 1 and 2 threads, at
    the default plan and at the finest, the average comes out bit for bit the same."""
    rng = np.random.default_rng(7)
    shape = (77, 13)  # 1,001 elements: 63 runs of 16 at the finest plan, the last of 9
    average, param = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    outcomes = []
    for threads, plan in ((1, "default"), (2, "default"), (1, "finest"), (2, "finest")):
        mine = average.copy()
        with backends.use_threads(other, threads), tile_plan(other, plan):
            backends.get(other).ema_update(mine, param, 0.9)
        outcomes.append(mine.tobytes())
    assert all(outcome == outcomes[0] for outcome in outcomes[1:]), f"{other}.ema_update depends on its threads"
    assert outcomes[0] != average.tobytes()
