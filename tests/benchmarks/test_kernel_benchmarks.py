"""Micro benchmarks of the training step's kernels, numpy and numba side by side, on the shapes of two
real workloads.

Each benchmark sets `benchmark.group` to "<kernel> <workload>", so pytest-benchmark prints numpy and
numba of one kernel and shape in one table. Under the project's default `--benchmark-disable` each
runs once as a plain test; either way it first checks its result against the NumPy reference run in
float64 on the same inputs. That first call also compiles numba's kernel for the exact argument
types, so compile time never lands in a figure (and the `backend` fixture warms everything once).

Tolerance: the float32 results are sums of up to K = 3072 products (dense layers); their rounding
error grows like sqrt(K) * eps32 = 6.6e-6 of the terms' scale (see float32_tol in test_equivalence,
2.6e-5 with its margin). RTOL = 1e-4 leaves a further factor 4, and the absolute part is RTOL times the
largest |expected|, since an element near 0 is a sum that cancelled and errs like its terms.
"""

from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest

from fastnet import backends
from fastnet.backends import numpy_backend as ref
from fastnet.config import recipe_config
from fastnet.model import LAYERNORM_EPS, MLP
from fastnet.optim import OPTIMIZERS, Optimizer
from fastnet.step import warm_up
from fastnet.workloads import WORKLOADS
from helpers import assert_close

N_IMAGES = 2048
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
    """Float32 arrays for one workload: data, and x, W, b, dout, relu output per layer shape."""
    sizes, batch = WORKLOADS[request.param].sizes, WORKLOADS[request.param].batch_size
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    shapes = {"first": sizes[:2], "last": sizes[-2:]}
    if len(sizes) > 3:
        shapes["hidden"] = sizes[1:3]
    layers = {name: SimpleNamespace(
        fan_in=d, fan_out=h, x=normal(batch, d), W=normal(d, h, scale=np.sqrt(2 / d)), b=normal(h, scale=0.1),
        dout=normal(batch, h, scale=1 / batch), relu_out=np.maximum(normal(batch, h), 0))
        for name, (d, h) in shapes.items()}
    return SimpleNamespace(
        name=request.param, sizes=sizes, batch=batch, layers=layers,
        images=rng.integers(0, 256, (N_IMAGES, sizes[0]), dtype=np.uint8),
        indices=rng.integers(0, N_IMAGES, batch), labels=rng.integers(0, sizes[-1], batch),
        shift=rng.uniform(100, 150, sizes[0]).astype(np.float32),
        scale=(1 / rng.uniform(50, 70, sizes[0])).astype(np.float32),
        logits=normal(batch, sizes[-1], scale=3.0), grad=normal(*sizes[:2], scale=1e-2),
        velocity=normal(*sizes[:2], scale=1e-2), m=normal(*sizes[:2], scale=1e-2),
        v=np.square(normal(*sizes[:2], scale=1e-2)))


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


def gflop(*dims):
    return round(2 * float(np.prod(dims)) / 1e9, 4)


def test_gather_normalize(benchmark, backend, workload):
    w = workload
    out = np.zeros((w.batch, w.sizes[0]), np.float32)
    run_checked(benchmark, backend, "gather_normalize", (w.images, w.indices, w.shift, w.scale, out),
                f"gather_normalize {w.name}", MB_moved=round(out.size * 5 / 1e6, 3))  # 1 B read, 4 written


def test_gather_flip_components(benchmark, backend, workload):
    """The gather of fastnet train --pca 256 --flip: rows of 256 components, about half of them flipped."""
    w = workload
    rng = np.random.default_rng(1)
    components = rng.standard_normal((N_IMAGES, 256)).astype(np.float32)
    flips = rng.integers(0, 2, w.batch).astype(np.uint8)
    signs = np.where(rng.random(256) < 0.5, -1, 1).astype(np.float32)
    out = np.zeros((w.batch, 256), np.float32)
    run_checked(benchmark, backend, "gather_flip_components", (components, w.indices, flips, signs, out),
                f"gather_flip_components {w.name}")


@pytest.mark.parametrize("layer", ["first", "last"])
@pytest.mark.parametrize("kernel", ["dense_relu_forward", "dense_forward"])
def test_dense_forward(benchmark, backend, workload, kernel, layer):
    L = workload.layers[layer]
    out = np.zeros((workload.batch, L.fan_out), np.float32)
    run_checked(benchmark, backend, kernel, (L.x, L.W, L.b, out), f"{kernel}[{layer}] {workload.name}",
                GFLOP=gflop(workload.batch, L.fan_in, L.fan_out))


@pytest.mark.parametrize("with_dx", [False, True])
def test_dense_relu_backward(benchmark, backend, workload, with_dx):
    # With dx: the hidden-to-hidden layer; R2 has none, so there it is the first layer with dx.
    layer = "hidden" if with_dx and "hidden" in workload.layers else "first"
    L = workload.layers[layer]
    # dout is masked in place by the ReLU; masking again changes nothing, so rounds do not drift.
    dout = L.dout.copy()
    dx = np.zeros_like(L.x) if with_dx else None
    args = (dout, L.relu_out, L.x, L.W, np.zeros_like(L.W), np.zeros_like(L.b), dx)
    run_checked(benchmark, backend, "dense_relu_backward", args, f"dense_relu_backward[{layer}] {workload.name}",
                GFLOP=gflop(workload.batch, L.fan_in, L.fan_out) * (2 if with_dx else 1))


def test_dense_backward(benchmark, backend, workload):
    L = workload.layers["last"]
    args = (L.dout, L.x, L.W, np.zeros_like(L.W), np.zeros_like(L.b), np.zeros_like(L.x))
    run_checked(benchmark, backend, "dense_backward", args, f"dense_backward[last] {workload.name}",
                GFLOP=gflop(workload.batch, L.fan_in, L.fan_out) * 2)


def test_softmax_cross_entropy(benchmark, backend, workload):
    dlogits = np.zeros_like(workload.logits)
    loss, want = run_checked(benchmark, backend, "softmax_cross_entropy", (workload.logits, workload.labels, dlogits),
                             f"softmax_cross_entropy {workload.name}")
    assert loss == pytest.approx(want, rel=1e-5)


def test_count_correct(benchmark, backend, workload):
    correct, want = run_checked(benchmark, backend, "count_correct", (workload.logits, workload.labels),
                                f"count_correct {workload.name}")
    assert correct == want


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


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_optimizer_step(benchmark, backend, workload, kind):
    """One update of the first layer's weights (3072 x hidden). Each round starts from fresh copies of
    the parameter and its state (made in setup, not timed), so rounds cannot drift."""
    w = workload
    W = w.layers["first"].W
    state = {"sgd": [], "momentum": [w.velocity], "nesterov": [w.velocity], "adam": [w.m, w.v], "adamw": [w.m, w.v]}
    hyper = {"sgd": (0.05, 5e-3), "momentum": (0.05, 0.9, 5e-3), "nesterov": (0.05, 0.9, 5e-3),
             "adam": (1e-3, 0.9, 0.999, 1e-8, 5e-3, 10), "adamw": (1e-3, 0.9, 0.999, 1e-8, 5e-3, 10)}[kind]

    def fresh():
        return (W.copy(), w.grad, *[s.copy() for s in state[kind]], *hyper), {}

    kernel = getattr(backend, f"{kind}_step")
    args, _ = fresh()
    expected, _ = on_reference(f"{kind}_step", *args)
    kernel(*args)
    check(args, expected)
    benchmark.group = f"{kind}_step {w.name}"
    benchmark.extra_info["MB_moved"] = round(W.nbytes * (3 + 2 * len(state[kind])) / 1e6, 1)
    benchmark.pedantic(kernel, setup=fresh, rounds=20, warmup_rounds=1)


def test_train_step(benchmark, backend, workload):
    """gather + forward + count_correct + backward + momentum update: one step of train_epoch. Checked
    against a float64 numpy model of the same seed after one step at lr 0.05; timed at a tiny lr."""
    w = workload
    nets = [MLP(w.sizes, backend=name, dtype=dtype, seed=0)
            for name, dtype in ((backend.NAME, "float32"), ("numpy", "float64"))]
    optimizers = [Optimizer(net.params, "momentum", weight_decay=5e-3, backend=net.backend) for net in nets]

    def step(net, optimizer, lr):
        k, ws = net.kernels, net.workspace(w.batch)
        ws.labels[...] = w.labels
        k.gather_normalize(w.images, w.indices, w.shift.astype(net.dtype), w.scale.astype(net.dtype), ws.inputs)
        net.run_forward(ws)
        correct = k.count_correct(ws.logits, ws.labels)
        loss = net.run_backward(ws)
        optimizer.step(ws.grads, lr)
        return loss, correct

    (loss, correct), (want_loss, want_correct) = [step(n, o, 0.05) for n, o in zip(nets, optimizers, strict=True)]
    assert loss == pytest.approx(want_loss, rel=RTOL) and correct == want_correct
    check(nets[0].params, nets[1].params)
    benchmark.group = f"train_step {w.name}"
    benchmark.extra_info["GFLOP"] = round(sum(gflop(w.batch, d, h) * (3 if i else 2)
                                              for i, (d, h) in enumerate(pairwise(w.sizes))), 4)
    benchmark(step, nets[0], optimizers[0], 1e-5)
