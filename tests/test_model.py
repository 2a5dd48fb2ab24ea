"""The public MLP API, its gradients against finite differences, its dtype discipline, and its loss and
gradients on every other backend against numpy's."""

import numpy as np
import pytest

import fastnet
from fastnet import backends
from fastnet.backends import numpy_backend
from fastnet.errors import FastnetError
from fastnet.model import MLP
from helpers import (
    DTYPES,
    FLOAT64_TOL,
    Float64Detector,
    assert_close,
    assert_loss_matches,
    float32_tol,
    numerical_gradient,
    relative_error,
)


def small_batch(rng, sizes, batch):
    return rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch)


def test_params_are_live_arrays_of_the_documented_shapes():
    net = fastnet.MLP([12, 7, 5, 3])
    assert [p.shape for p in net.params] == [(12, 7), (7,), (7, 5), (5,), (5, 3), (3,)]
    assert all(p.dtype == np.float32 for p in net.params)
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    before = net.forward(x)
    net.params[-1][...] = 10.0  # the output bias: every logit moves by exactly 10
    assert_close(net.forward(x), before + 10.0, rtol=1e-6, atol=1e-5)


def test_forward_and_predict_shapes():
    net = fastnet.MLP([6, 4, 3], dtype="float64", seed=3)
    x = np.random.default_rng(1).standard_normal((5, 6))
    logits = net.forward(x)
    assert logits.shape == (5, 3) and logits.dtype == np.float64
    assert_close(net.predict(x), logits.argmax(axis=1), rtol=0)
    # The forward pass is the textbook one.
    W1, b1, W2, b2 = net.params
    assert_close(logits, np.maximum(x @ W1 + b1, 0) @ W2 + b2, rtol=1e-12)


def test_forward_in_chunks_equals_forward_at_once():
    net = fastnet.MLP([3, 4, 2], dtype="float64")
    x = np.random.default_rng(2).standard_normal((2500, 3))  # more than one forward chunk
    W1, b1, W2, b2 = net.params
    assert_close(net.forward(x), np.maximum(x @ W1 + b1, 0) @ W2 + b2, rtol=1e-12, atol=1e-12)


def test_he_initialisation_and_seed():
    a, b, c = (fastnet.MLP([2000, 300, 10], seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(p, q) for p, q in zip(a.params, b.params, strict=True))
    assert not np.array_equal(a.params[0], c.params[0])
    assert a.params[0].std() == pytest.approx(np.sqrt(2 / 2000), rel=0.02)
    assert not a.params[1].any()


@pytest.mark.parametrize("sizes, batch", [([7, 5, 3], 4), ([6, 5, 4, 3], 1), ([3, 1, 2], 5)])
def test_loss_and_grads_match_finite_differences(sizes, batch):
    net = fastnet.MLP(sizes, dtype="float64", seed=11)
    rng = np.random.default_rng(5)
    x, y = small_batch(rng, sizes, batch)
    loss, grads = net.loss_and_grads(x, y)
    assert isinstance(loss, float)
    assert [g.shape for g in grads] == [p.shape for p in net.params]
    for param, grad in zip(net.params, grads, strict=True):
        numeric = numerical_gradient(lambda: net.loss_and_grads(x, y)[0], param)
        assert relative_error(grad, numeric) < 1e-6


def test_loss_is_mean_cross_entropy_of_forward():
    net = fastnet.MLP([5, 4, 3], dtype="float64")
    x, y = small_batch(np.random.default_rng(6), [5, 4, 3], 8)
    logits = net.forward(x)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert net.loss_and_grads(x, y)[0] == pytest.approx(-log_probs[np.arange(8), y].mean(), rel=1e-12)


def test_gradients_returned_are_not_overwritten_by_the_next_call():
    net = fastnet.MLP([5, 4, 3], dtype="float64")
    rng = np.random.default_rng(7)
    _, first = net.loss_and_grads(*small_batch(rng, [5, 4, 3], 6))
    kept = [g.copy() for g in first]
    net.loss_and_grads(*small_batch(rng, [5, 4, 3], 6))
    assert all(np.array_equal(a, b) for a, b in zip(first, kept, strict=True))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="sizes"):
        fastnet.MLP([10])
    with pytest.raises(ValueError, match="dtype"):
        fastnet.MLP([3, 2], dtype="int32")
    with pytest.raises(FastnetError, match="unknown backend 'nope'"):
        fastnet.MLP([3, 2], backend="nope")
    with pytest.raises(ValueError, match="takes 3 inputs"):
        fastnet.MLP([3, 2]).forward(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("backend", backends.available())
def test_no_float64_reaches_a_kernel_in_a_float32_training_step(backend):
    from fastnet.optim import Optimizer, Schedule

    detector = Float64Detector(backends.get(backend))
    backends.register("float64-detector", detector)
    try:
        net = fastnet.MLP([8, 6, 5, 3], backend="float64-detector")
        optimizers = [Optimizer(net.params, kind, weight_decay=1e-3, backend="float64-detector")
                      for kind in ("sgd", "momentum", "nesterov", "adam", "adamw")]
        schedule = Schedule("onecycle", 0.1, 10)
        ws = net.workspace(4)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (10, 8), dtype=np.uint8)
        shift, scale = np.full(8, 127, np.float32), np.full(8, 1 / 64, np.float32)
        for step, optimizer in enumerate(optimizers):
            net.kernels.gather_normalize(images, np.array([1, 3, 5, 7]), shift, scale, ws.inputs)
            ws.labels[...] = [0, 1, 2, 0]
            net.run_forward(ws)
            net.run_backward(ws)
            optimizer.step(ws.grads, schedule(step))
            arrays = net.params + ws.grads + ws.activations + ws.deltas[1:]
            arrays += [a for group in optimizer.state.values() for a in group]
            assert all(a.dtype == np.float32 for a in arrays)
        assert detector.calls > 30
    finally:
        backends._backends.pop("float64-detector")


# --- Activations, layer norm, dropout, label smoothing -----------------------------------------------

SPECS = [dict(activation=a, norm=n, dropout=d) for a in ("relu", "leaky_relu", "gelu", "tanh")
         for n in (None, "layernorm") for d in (0.0, 0.3)]


def spec_id(spec):
    return f"{spec['activation']}-{spec['norm'] or 'nonorm'}-dropout{spec['dropout']}"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_layer_kind_matches_finite_differences(spec, smoothing):
    """A training pass: dropout masks from a generator that is re-seeded for every evaluation, so the
    finite differences see the same masks as the analytic gradient."""
    net = fastnet.MLP([7, 6, 4, 3], dtype="float64", seed=2, **spec)
    x, y = small_batch(np.random.default_rng(0), [7, 6, 4, 3], 5)

    def loss_and_grads():
        return net.loss_and_grads(x, y, rng=np.random.default_rng(9), label_smoothing=smoothing)

    loss, grads = loss_and_grads()
    assert [g.shape for g in grads] == [p.shape for p in net.params]
    for param, grad in zip(net.params, grads, strict=True):
        numeric = numerical_gradient(lambda: loss_and_grads()[0], param)
        assert relative_error(grad, numeric) < 1e-6


def textbook_forward(net, x, masks=None):
    """The forward pass of a network from its spec, written out: dense, layer norm, activation, dropout."""
    activation = {"relu": lambda z: np.maximum(z, 0), "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
                  "tanh": np.tanh,
                  "gelu": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))}
    a = x
    for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        z = a @ W + b
        if i == net.num_layers - 1:
            return z
        if net.norm == "layernorm":
            z = (z - z.mean(axis=1, keepdims=True)) / np.sqrt(z.var(axis=1, keepdims=True) + 1e-5)
            z = z * net.norm_gains[i] + net.norm_biases[i]
        a = activation[net.activation](z)
        if masks is not None:
            a = a * (masks[i] >= net.dropout) / (1 - net.dropout)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward_is_the_textbook_one_and_has_no_dropout(spec):
    net = fastnet.MLP([6, 5, 4, 3], dtype="float64", seed=3, **spec)
    for gain, bias in zip(net.norm_gains, net.norm_biases, strict=True):  # not the initial 1 and 0, to see them used
        gain[...] = np.linspace(0.5, 1.5, len(gain))
        bias[...] = np.linspace(-0.2, 0.3, len(bias))
    x = np.random.default_rng(1).standard_normal((8, 6))
    assert_close(net.forward(x), textbook_forward(net, x), rtol=1e-12, atol=1e-12)
    assert np.array_equal(net.forward(x), net.forward(x))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_training_pass_drops_units_drawn_from_the_generator(activation):
    net = fastnet.MLP([6, 50, 40, 3], dtype="float64", seed=3, activation=activation, dropout=0.4)
    x = np.random.default_rng(1).standard_normal((8, 6))
    ws = net.workspace(8)
    ws.inputs[...] = x
    rng = np.random.default_rng(5)
    logits = net.run_forward(ws, rng).copy()
    assert ws.dropout_applied
    # One key per hidden layer, in order; a layer's numbers are draw_uniform's of its key.
    replay, masks = np.random.default_rng(5), [np.empty((8, 50)), np.empty((8, 40))]
    for mask in masks:
        numpy_backend.draw_uniform(replay.integers(0, 2**64, dtype=np.uint64), 0, mask)
    assert_close(logits, textbook_forward(net, x, masks), rtol=1e-12, atol=1e-12)
    assert np.mean(ws.activations[1] == 0) > 0.3  # dropped, on top of the ReLU's zeros
    # The same seed gives the same pass; another seed another one; no generator, no dropout.
    assert np.array_equal(net.run_forward(ws, np.random.default_rng(5)), logits)
    assert not np.array_equal(net.run_forward(ws, np.random.default_rng(6)), logits)
    assert_close(net.run_forward(ws).copy(), net.forward(x), rtol=0)
    assert not ws.dropout_applied


def test_a_network_without_dropout_draws_nothing():
    net = fastnet.MLP([6, 5, 3], activation="tanh", norm="layernorm")
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    ws = net.workspace(2)
    net.run_forward(ws, rng)
    assert rng.bit_generator.state == state


def test_loss_and_grads_is_deterministic_without_a_generator():
    x, y = small_batch(np.random.default_rng(0), [6, 5, 3], 4)
    with_dropout = fastnet.MLP([6, 5, 3], dtype="float64", seed=1, dropout=0.5)
    without = fastnet.MLP([6, 5, 3], dtype="float64", seed=1)
    loss, grads = with_dropout.loss_and_grads(x, y)
    expected_loss, expected = without.loss_and_grads(x, y)
    assert loss == expected_loss and all(np.array_equal(g, e) for g, e in zip(grads, expected, strict=True))


def test_label_smoothing_changes_the_loss_as_defined():
    net = fastnet.MLP([5, 4, 3], dtype="float64")
    x, y = small_batch(np.random.default_rng(6), [5, 4, 3], 8)
    logits = net.forward(x)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(0.8 * log_probs[np.arange(8), y] + 0.2 * log_probs.mean(axis=1)).mean()
    assert net.loss_and_grads(x, y, label_smoothing=0.2)[0] == pytest.approx(expected, rel=1e-12)


# --- The default network is unchanged -----------------------------------------------------------------

def test_the_default_network_runs_the_relu_kernels_as_before():
    """Bit for bit what the network computed before activations, norm and dropout existed: the fused
    ReLU kernels, layer by layer, params in the order W1, b1, W2, b2, ..."""
    net = fastnet.MLP([12, 7, 5, 3], seed=4)
    assert net.spec() == {"activation": "relu", "dropout": 0.0, "norm": None}
    assert net.weights == net.params[0::2] and net.biases == net.params[1::2]
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 12)).astype(np.float32), rng.integers(0, 3, 6)
    loss, grads = net.loss_and_grads(x, y, rng=np.random.default_rng(0))

    k, W, b = net.kernels, net.params[0::2], net.params[1::2]
    a = [x] + [np.empty((6, w), np.float32) for w in (7, 5, 3)]
    for i in range(3):
        (k.dense_forward if i == 2 else k.dense_relu_forward)(a[i], W[i], b[i], a[i + 1])
    d = [None] + [np.empty((6, w), np.float32) for w in (7, 5, 3)]
    expected_loss = k.softmax_cross_entropy(a[3], y, d[3])
    expected = [np.empty_like(p) for p in net.params]
    for i in reversed(range(3)):
        if i == 2:
            k.dense_backward(d[3], a[2], W[2], expected[4], expected[5], d[2])
        else:
            k.dense_relu_backward(d[i + 1], a[i + 1], a[i], W[i], expected[2 * i], expected[2 * i + 1],
                                  d[i] if i else None)
    assert loss == expected_loss
    assert all(np.array_equal(g, e) for g, e in zip(grads, expected, strict=True))


# --- Spec, parameters, clipping -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_spec_rebuilds_the_same_architecture(spec):
    import json

    net = fastnet.MLP([9, 6, 5, 2], seed=7, **spec)
    stored = json.loads(json.dumps(net.spec()))
    assert stored == spec
    twin = fastnet.MLP(net.sizes, **stored, backend="numpy", dtype="float64", seed=7)
    assert twin.spec() == net.spec()
    assert [p.shape for p in twin.params] == [p.shape for p in net.params]
    for p, q in zip(net.params, twin.params, strict=True):  # the same seed draws the same weights in either dtype
        assert_close(q.astype(np.float32), p, rtol=0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_pickled_network_computes_the_same_and_trains_on(backend):
    import pickle

    net = fastnet.MLP([9, 6, 5, 3], backend=backend, seed=3, activation="gelu", norm="layernorm", dropout=0.2,
                      precision="bf16" if backend == "numba" else "fp32")
    net.params[1][...] = 0.25  # not what a fresh network of the seed holds
    twin = pickle.loads(pickle.dumps(net))
    assert twin.kernels is backends.get(backend) and twin.spec() == net.spec() and twin.precision == net.precision
    x = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    np.testing.assert_array_equal(twin.forward(x), net.forward(x))
    y = np.arange(4) % 3
    loss, grads = net.loss_and_grads(x, y)
    twin_loss, twin_grads = twin.loss_and_grads(x, y)  # bf16 copies remade: the products read the same operands
    assert twin_loss == loss and all(np.array_equal(a, b) for a, b in zip(grads, twin_grads, strict=True))
    twin.params[0][...] = 0.0
    assert twin._weights[0] is twin.params[0] and not np.array_equal(twin.forward(x), net.forward(x))


def test_layernorm_parameters_follow_their_layer_and_are_not_weights():
    net = fastnet.MLP([12, 7, 5, 3], norm="layernorm")
    assert [p.shape for p in net.params] == [(12, 7), (7,), (7,), (7,), (7, 5), (5,), (5,), (5,), (5, 3), (3,)]
    assert [w.shape for w in net.weights] == [(12, 7), (7, 5), (5, 3)]
    assert [b.shape for b in net.biases] == [(7,), (5,), (3,)]
    assert all(np.shares_memory(w, p) for w, p in zip(net.weights, net.params[0::4], strict=True))
    assert all((g == 1).all() for g in net.norm_gains) and not any(b.any() for b in net.norm_biases)
    assert net.params[2] is net.norm_gains[0] and net.params[3] is net.norm_biases[0]


def test_tanh_starts_with_lecun_initialisation():
    net = fastnet.MLP([2000, 300, 10], activation="tanh", seed=7)
    assert net.weights[0].std() == pytest.approx(np.sqrt(1 / 2000), rel=0.02)


def test_clip_grad_norm_scales_the_gradients_to_the_limit():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))
    original = [g.copy() for g in grads]
    net = fastnet.MLP([4, 3])
    assert net.clip_grad_norm(grads, 10 * norm) == pytest.approx(norm, rel=1e-6)
    assert all(np.array_equal(g, o) for g, o in zip(grads, original, strict=True))  # under the limit: untouched
    assert net.clip_grad_norm(grads, 0.5) == pytest.approx(norm, rel=1e-6)
    clipped = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    assert clipped == pytest.approx(0.5, rel=1e-5)
    assert all(g.dtype == np.float32 for g in grads)
    assert_close(grads[0], original[0] * np.float32(0.5 / norm), rtol=1e-5)


def test_bad_architecture_arguments_are_rejected():
    with pytest.raises(ValueError, match="activation"):
        fastnet.MLP([3, 2], activation="sigmoid")
    with pytest.raises(ValueError, match="dropout"):
        fastnet.MLP([3, 2], dropout=1.0)
    with pytest.raises(ValueError, match="norm"):
        fastnet.MLP([3, 2], norm="batchnorm")
    with pytest.raises(ValueError, match="label_smoothing"):
        fastnet.MLP([3, 2]).loss_and_grads(np.zeros((1, 3)), [0], label_smoothing=1.0)
    with pytest.raises(ValueError, match="unknown norm 'none'"):  # the command line's spelling of None
        fastnet.MLP([3, 2], norm="none")


@pytest.mark.parametrize("backend", backends.available())
def test_no_float64_reaches_a_kernel_in_a_regularised_float32_training_step(backend):
    from fastnet.data import Augmentation
    from fastnet.optim import Optimizer

    detector = Float64Detector(backends.get(backend))
    backends.register("float64-detector", detector)
    try:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (10, 2, 2, 2), dtype=np.uint8)
        shift, scale = np.full(8, 127, np.float32), np.full(8, 1 / 64, np.float32)
        augmentation = Augmentation((2, 2, 2), flip=True, translate=1, cutout=1)
        for activation in ("leaky_relu", "gelu", "tanh"):
            net = fastnet.MLP([8, 6, 5, 3], backend="float64-detector", activation=activation, dropout=0.2,
                              norm="layernorm")
            optimizer = Optimizer(net.params, "adamw", weight_decay=1e-3, backend="float64-detector")
            ws = net.workspace(4)
            augmentation.apply(net.kernels, images, np.array([1, 3, 5, 7]), rng, shift, scale, ws.inputs)
            ws.labels[...] = [0, 1, 2, 0]
            net.run_forward(ws, rng)
            net.run_backward(ws, label_smoothing=0.1)
            net.clip_grad_norm(ws.grads, 0.1)
            optimizer.step(ws.grads, 0.01)
            arrays = net.params + ws.grads + ws.activations + ws.deltas[1:]
            arrays += [a for group in (ws.pre, ws.xhat, ws.inv_std, ws.hidden, ws.uniform) for a in group]
            assert all(a.dtype == np.float32 for a in arrays)
        assert detector.calls > 40
    finally:
        backends._backends.pop("float64-detector")


@pytest.mark.parametrize("spec", [{}, {"activation": "gelu", "norm": "layernorm"}], ids=["relu", "gelu-layernorm"])
def test_a_network_with_its_input_projection_folded_in_computes_the_same_on_raw_inputs(spec):
    rng = np.random.default_rng(4)
    net = fastnet.MLP([5, 4, 3], dtype="float64", seed=2, **spec)
    for p in net.params:
        p += rng.standard_normal(p.shape) * 0.1  # layer-norm gains and biases away from 1 and 0 too
    projection = rng.standard_normal((12, 5))
    raw = rng.standard_normal((7, 12))
    folded = net.with_input_projection(projection)
    assert folded.sizes == [12, 4, 3] and folded.spec() == net.spec() and folded.dtype == np.float64
    assert_close(folded.forward(raw), net.forward(raw @ projection), rtol=1e-12, atol=1e-12)
    # Folding into an existing network overwrites all of it and returns it.
    target = fastnet.MLP([12, 4, 3], dtype="float64", seed=9, **spec)
    assert net.with_input_projection(projection, into=target) is target
    assert all(np.array_equal(p, q) for p, q in zip(target.params, folded.params, strict=True))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_backward_hands_each_layer_over_last_first_once_its_gradients_are_final(backend, norm):
    """The layer_done hook of run_backward (a data-parallel rank sends a layer's gradients from it):
    called once per layer, from the last down, and what the layer's gradients hold then is what they
    hold at the end, while the layers below are still stale."""
    net = fastnet.MLP([6, 9, 7, 3], backend=backend, seed=2, norm=norm, dropout=0.2)
    ws = net.workspace(5)
    ws.inputs[...] = np.random.default_rng(0).standard_normal((5, 6))
    ws.labels[...] = [0, 2, 1, 1, 0]
    net.run_forward(ws, np.random.default_rng(1))
    for grad in ws.grads:
        grad[...] = np.nan
    seen = []

    def layer_done(hooked, hooked_ws, layer):
        assert hooked is net and hooked_ws is ws
        below = [g for lower in range(layer) for g in net.layer_grads(ws, lower)]
        assert all(np.isnan(g).all() for g in below)
        seen.append((layer, [g.copy() for g in net.layer_grads(ws, layer)]))

    net.run_backward(ws, layer_done=layer_done)
    assert [layer for layer, _ in seen] == [2, 1, 0]
    assert [len(grads) for _, grads in seen] == ([2, 4, 4] if norm else [2, 2, 2])
    for layer, grads in seen:
        for then, now in zip(grads, net.layer_grads(ws, layer), strict=True):
            assert np.array_equal(then, now) and np.isfinite(now).all()
    assert sum(len(grads) for _, grads in seen) == len(ws.grads)


# --- Every backend's loss and gradients against numpy's ---------------------------------------------

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
