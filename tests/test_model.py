"""The public MLP API, its gradients against finite differences, and its dtype discipline."""

import numpy as np
import pytest

import fastnet
from fastnet import backends
from fastnet.errors import FastnetError
from helpers import Float64Detector, assert_close, numerical_gradient, relative_error


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
    assert all(np.array_equal(p, q) for p, q in zip(a.params, b.params))
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
    for param, grad in zip(net.params, grads):
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
    assert all(np.array_equal(a, b) for a, b in zip(first, kept))


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
