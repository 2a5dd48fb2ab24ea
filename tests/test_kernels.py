"""The NumPy reference kernels against centred finite differences in float64 and against independent,
written-out formulas."""

import numpy as np
import pytest

from fastnet.backends import numpy_backend as ref
from helpers import assert_close, numerical_gradient, relative_error

GRAD_TOL = 1e-6


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("batch, fan_in, fan_out", [(1, 1, 1), (3, 5, 4), (7, 2, 9)])
def test_dense_backward_matches_finite_differences(rng, batch, fan_in, fan_out):
    x = rng.standard_normal((batch, fan_in))
    W = rng.standard_normal((fan_in, fan_out))
    b = rng.standard_normal(fan_out)
    upstream = rng.standard_normal((batch, fan_out))
    out = np.empty((batch, fan_out))

    def loss():  # a scalar whose gradient with respect to out is `upstream`
        return float(np.sum(ref.dense_forward(x, W, b, out) * upstream))

    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    ref.dense_backward(upstream, x, W, dW, db, dx)
    for analytic, variable in ((dW, W), (db, b), (dx, x)):
        assert relative_error(analytic, numerical_gradient(loss, variable)) < GRAD_TOL


def test_dense_relu_backward_matches_finite_differences(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    upstream = rng.standard_normal((5, 6))
    out = ref.dense_relu_forward(x, W, b, np.empty((5, 6)))
    assert (out == 0).any() and (out > 0).any()

    def loss():
        return float(np.sum(ref.dense_relu_forward(x, W, b, np.empty((5, 6))) * upstream))

    dout = upstream.copy()
    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    ref.dense_relu_backward(dout, out, x, W, dW, db, dx)
    for analytic, variable in ((dW, W), (db, b), (dx, x)):
        assert relative_error(analytic, numerical_gradient(loss, variable)) < GRAD_TOL
    assert_close(dout, upstream * (out > 0), rtol=0)  # masked in place, as documented


def test_dense_backward_skips_dx_when_not_asked(rng):
    x, W = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    dW, db = np.empty_like(W), np.empty(2)
    ref.dense_backward(np.ones((4, 2)), x, W, dW, db, None)
    assert_close(dW, x.T @ np.ones((4, 2)), rtol=1e-12)
    assert_close(db, np.full(2, 4.0), rtol=1e-12)


def test_dense_relu_forward_is_relu_of_dense(rng):
    x, W, b = rng.standard_normal((5, 6)), rng.standard_normal((6, 7)), rng.standard_normal(7)
    out = ref.dense_relu_forward(x, W, b, np.empty((5, 7)))
    assert_close(out, np.maximum(x @ W + b, 0), rtol=1e-12)
    assert (out == 0).any() and (out > 0).any()


def test_relu_backward_matches_finite_differences(rng):
    # Keep inputs away from the kink at 0, where the derivative is undefined.
    x = rng.uniform(0.1, 1.0, (4, 6)) * rng.choice([-1.0, 1.0], (4, 6))
    upstream = rng.standard_normal((4, 6))

    def loss():
        return float(np.sum(np.maximum(x, 0) * upstream))

    dx = ref.relu_backward(upstream, np.maximum(x, 0), np.empty_like(x))
    assert relative_error(dx, numerical_gradient(loss, x)) < GRAD_TOL


def naive_cross_entropy(logits, labels):
    """-log softmax(logits)[label], averaged, straight from the definition."""
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


@pytest.mark.parametrize("batch, classes", [(1, 1), (1, 10), (6, 3), (13, 10)])
def test_softmax_cross_entropy_value_and_gradient(rng, batch, classes):
    logits = rng.standard_normal((batch, classes)) * 3
    labels = rng.integers(0, classes, batch)
    dlogits = np.empty_like(logits)
    loss = ref.softmax_cross_entropy(logits, labels, dlogits)
    assert isinstance(loss, float)
    assert loss == pytest.approx(naive_cross_entropy(logits, labels), rel=1e-12, abs=1e-12)
    numeric = numerical_gradient(lambda: ref.softmax_cross_entropy(logits, labels, np.empty_like(logits)), logits)
    assert relative_error(dlogits, numeric) < GRAD_TOL


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5000.0, 5000.0, 0.0]], np.float32)
    dlogits = np.empty_like(logits)
    loss = ref.softmax_cross_entropy(logits, np.array([2, 1]), dlogits)
    # Row 0 puts all mass on the wrong class (loss 2000); row 1 on the right one (loss 0).
    assert loss == pytest.approx(1000.0, rel=1e-6)
    assert np.isfinite(dlogits).all() and dlogits.dtype == np.float32


def test_count_correct():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    assert ref.count_correct(logits, np.array([1, 1, 1])) == 2
    assert ref.count_correct(logits, np.array([0, 0, 0])) == 1


@pytest.mark.parametrize("source_dtype", [np.uint8, np.float32])
def test_gather_normalize(rng, source_dtype):
    images = rng.integers(0, 256, (9, 5)).astype(source_dtype)
    indices = np.array([4, 0, 4, 8])
    shift = rng.uniform(0, 200, 5).astype(np.float32)
    scale = rng.uniform(0.01, 1, 5).astype(np.float32)
    out = ref.gather_normalize(images, indices, shift, scale, np.empty((4, 5), np.float32))
    expected = (images[indices].astype(np.float64) - shift) * scale
    assert_close(out, expected.astype(np.float32), rtol=1e-6, atol=1e-5)


# --- Optimizers, against the update rules as PyTorch documents them, unrolled over several steps ---

def reference_updates(kind, param, grads, lr, momentum, decay, betas=(0.9, 0.999), eps=1e-8):
    """The parameter after applying `grads` one after another, from the textbook rules."""
    p = param.copy()
    v = np.zeros_like(p)
    m, s = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if kind == "adamw":
            p = p - lr * decay * p
        else:
            g = g + decay * p
        if kind == "sgd":
            p = p - lr * g
        elif kind == "momentum":
            v = momentum * v + g
            p = p - lr * v
        elif kind == "nesterov":
            v = momentum * v + g
            p = p - lr * (g + momentum * v)
        else:
            m = betas[0] * m + (1 - betas[0]) * g
            s = betas[1] * s + (1 - betas[1]) * g ** 2
            m_hat, s_hat = m / (1 - betas[0] ** t), s / (1 - betas[1] ** t)
            p = p - lr * m_hat / (np.sqrt(s_hat) + eps)
    return p


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_optimizer_steps_follow_the_textbook(rng, kind, decay):
    param = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(4)]
    lr, momentum = 0.05, 0.9
    p = param.copy()
    velocity, m, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if kind == "sgd":
            ref.sgd_step(p, g, lr, decay)
        elif kind in ("momentum", "nesterov"):
            getattr(ref, f"{kind}_step")(p, g, velocity, lr, momentum, decay)
        else:
            getattr(ref, f"{kind}_step")(p, g, m, v, lr, 0.9, 0.999, 1e-8, decay, t)
    assert_close(p, reference_updates(kind, param, grads, lr, momentum, decay), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_optimizer_steps_stay_float32(rng, kind):
    p = rng.standard_normal((4, 3)).astype(np.float32)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    state = [np.zeros_like(p), np.zeros_like(p)]
    before = p.copy()
    if kind == "sgd":
        ref.sgd_step(p, g, 0.1, 0.01)
    elif kind in ("momentum", "nesterov"):
        getattr(ref, f"{kind}_step")(p, g, state[0], 0.1, 0.9, 0.01)
    else:
        getattr(ref, f"{kind}_step")(p, g, state[0], state[1], 0.1, 0.9, 0.999, 1e-8, 0.01, 1)
    assert p.dtype == np.float32 and all(s.dtype == np.float32 for s in state)
    assert not np.array_equal(p, before)
