"""Micro benchmarks of the training step's kernels, numpy and numba side by side within one run, on
the shapes of two real workloads: the calls of fastnet/kernel_calls.py, which the asv suite follows
across commits, and the per-unit passes of --recipe best and a whole step, which it does not.

Each benchmark sets `benchmark.group` to "<call> <workload>", so pytest-benchmark prints numpy and
numba of one kernel and shape in one table. Under the project's default `--benchmark-disable` each
runs once as a plain test; either way it first checks its result against the NumPy reference run in
float64 on the same inputs. That first call also compiles numba's kernel for the exact argument
types, so compile time never lands in a figure (and the `backend` fixture warms everything once).

Tolerance: the float32 results are sums of up to K = 3072 products (dense layers); their rounding
error grows like sqrt(K) * eps32 = 6.6e-6 of the terms' scale (see float32_tol in tests/helpers.py,
2.6e-5 with its margin). RTOL = 1e-4 leaves a further factor 4, and the absolute part is RTOL times the
largest |expected|, since an element near 0 is a sum that cancelled and errs like its terms.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from fastnet import backends, kernel_calls
from fastnet.backends import numpy_backend as ref
from fastnet.config import recipe_config
from fastnet.model import LAYERNORM_EPS, MLP
from fastnet.optim import OPTIMIZERS, Optimizer
from fastnet.step import StepOptions, training_step, warm_up
from fastnet.workloads import WORKLOADS, flops_per_sample, product_flops
from helpers import assert_close

RTOL = 1e-4
BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    "numba" not in backends.available(), reason="numba is not installed: pip install numba"))]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """The backend's kernels, each compiled once for float32 arrays (warm_up runs a whole training
    step on tiny arrays, once per optimizer)."""
    net = MLP([3, 2, 2, 2], backend=request.param)
    for kind in OPTIMIZERS:
        warm_up(net, Optimizer(net.params, kind, backend=request.param), np.uint8)
    return net.kernels


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request):
    """fastnet.kernel_calls.inputs for one workload: the arrays every call runs on."""
    w = WORKLOADS[request.param]
    return SimpleNamespace(name=request.param, sizes=w.sizes, batch=w.batch_size,
                           inputs=kernel_calls.inputs(w.sizes, w.batch_size))


def on_reference(kernel, *args):
    """The NumPy reference `kernel` on float64 copies of args: (the copies, as it left them; its result).
    Call it before the backend, since some kernels update their arguments in place."""
    copies = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a for a in args]
    return copies, getattr(ref, kernel)(*copies)


def check(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        if isinstance(want, np.ndarray) and want.dtype == np.float64:
            assert_close(got, want, rtol=RTOL, atol=RTOL * float(np.max(np.abs(want))), dtype="float32")


def run_checked(benchmark, backend, kernel, args, group, **extra_info):
    """Check backend.kernel(*args) against the reference, then time it on the same arrays."""
    expected, want = on_reference(kernel, *args)
    got = getattr(backend, kernel)(*args)
    check(args, expected)
    benchmark.group = group
    benchmark.extra_info.update(extra_info)
    benchmark(getattr(backend, kernel), *args)
    return got, want


@pytest.mark.parametrize("name", list(kernel_calls.CALLS))
def test_kernel_call(benchmark, backend, workload, name):
    """Every call of fastnet.kernel_calls, the table asv times too: checked against the float64
    reference on the same inputs (arrays it updates, and a number it returns), then timed. A call
    that updates its state gets new arguments for every timed round (made in setup, not timed), so
    that rounds cannot drift."""
    call, w = kernel_calls.CALLS[name], workload.inputs
    layer = w.layers[call.layer]
    extra_info = {}
    if call.products:
        extra_info["GFLOP"] = round(call.products * product_flops(w.batch, layer.fan_in, layer.fan_out) / 1e9, 4)
    if call.moved:
        extra_info["MB_moved"] = round(call.moved(w, layer) / 1e6, 3)
    args = kernel_calls.call_arguments(name, w)
    if not call.updates:
        got, want = run_checked(benchmark, backend, call.kernel, args, f"{name} {workload.name}", **extra_info)
    else:
        expected, want = on_reference(call.kernel, *args)
        got = getattr(backend, call.kernel)(*args)
        check(args, expected)
        benchmark.group = f"{name} {workload.name}"
        benchmark.extra_info.update(extra_info)
        benchmark.pedantic(getattr(backend, call.kernel), setup=lambda: (kernel_calls.call_arguments(name, w), {}),
                           rounds=20, warmup_rounds=1)
    if isinstance(want, int):  # a count of correct predictions
        assert got == want
    elif want is not None:  # a loss
        assert got == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def best_layer():
    """Float32 arrays of one hidden layer of --recipe best (its width, the default batch), for the
    passes over every unit that its layer norm, GELU and dropout add to a step."""
    config = recipe_config("best")
    rng = np.random.default_rng(0)
    batch, width = config.batch_size, config.hidden[0]

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return SimpleNamespace(batch=batch, width=width, x=normal(batch, width), dout=normal(batch, width),
                           xhat=normal(batch, width), inv_std=np.abs(normal(batch)) + 0.5, gain=normal(width),
                           bias=normal(width), uniform=rng.random((batch, width), dtype=np.float32),
                           rate=config.dropout, out=np.zeros((batch, width), np.float32))


PER_UNIT = {  # kernel: its arguments, from best_layer's arrays (outputs fresh, so that no call feeds the next)
    "layernorm_forward": lambda L: (L.x, L.gain, L.bias, LAYERNORM_EPS, np.zeros_like(L.x), np.zeros_like(L.inv_std),
                                    L.out),
    "layernorm_backward": lambda L: (L.dout, L.xhat, L.inv_std, L.gain, np.zeros_like(L.gain),
                                     np.zeros_like(L.bias), L.out),
    "gelu_forward": lambda L: (L.x, L.out),
    "gelu_backward": lambda L: (L.dout, L.x, L.out),
    "draw_uniform": lambda L: (np.uint64(2026), 0, L.out),
    "dropout": lambda L: (L.x, L.uniform, L.rate, L.out),
}


@pytest.mark.parametrize("kernel", PER_UNIT)
def test_per_unit_pass_of_the_best_recipe(benchmark, backend, best_layer, kernel):
    L = best_layer
    run_checked(benchmark, backend, kernel, PER_UNIT[kernel](L), f"{kernel} best {L.batch}x{L.width}")


def test_the_calls_name_real_kernels_and_cover_every_optimizer():
    """A call whose kernel no backend has would be skipped by asv at every commit, not reported."""
    assert {call.kernel for call in kernel_calls.CALLS.values()} <= set(backends.KERNELS)
    assert {f"{kind}_step" for kind in OPTIMIZERS} <= set(kernel_calls.CALLS)
    assert set(kernel_calls.layer_shapes(WORKLOADS["R1"].sizes)) == {"first", "hidden", "last"}
    assert kernel_calls.layer_shapes(WORKLOADS["R2"].sizes) == {"first": (3072, 128), "last": (128, 10)}


def test_train_step(benchmark, backend, workload):
    """fastnet.step.training_step, the step train_epoch runs: gather + forward + count_correct + backward +
    momentum update. Checked against a float64 numpy model of the same seed after one step at lr 0.05;
    timed at a tiny lr."""
    w = workload.inputs
    images, rows = w.images[w.indices], np.arange(w.batch)  # the batch's images in its order, labels beside
    nets = [MLP(workload.sizes, backend=name, dtype=dtype, seed=0)
            for name, dtype in ((backend.NAME, "float32"), ("numpy", "float64"))]
    optimizers = [Optimizer(net.params, "momentum", weight_decay=5e-3, backend=net.backend) for net in nets]

    def step(net, optimizer, lr):
        return training_step(net, optimizer, images, w.labels, w.shift.astype(net.dtype), w.scale.astype(net.dtype),
                             rows, lr, StepOptions())

    (loss, correct), (want_loss, want_correct) = [step(n, o, 0.05) for n, o in zip(nets, optimizers, strict=True)]
    assert loss == pytest.approx(want_loss, rel=RTOL) and correct == want_correct
    check(nets[0].params, nets[1].params)
    benchmark.group = f"train_step {workload.name}"
    benchmark.extra_info["GFLOP"] = round(flops_per_sample(workload.sizes) * w.batch / 1e9, 4)
    benchmark(step, nets[0], optimizers[0], 1e-5)
