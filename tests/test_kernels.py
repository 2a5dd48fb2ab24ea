"""The NumPy reference kernels against centred finite differences in float64 and against independent,
written-out formulas."""

import numpy as np
import pytest

from fastnet.activations import ACTIVATIONS
from fastnet.backends import numpy_backend as ref
from helpers import assert_close, bf16_values, float32_tol, garbage, numerical_gradient, relative_error, to_bf16

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
        ref.dense_forward(x, W, b, out)
        return float(np.sum(out * upstream))

    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    ref.dense_backward(upstream, x, W, dW, db, dx)
    for analytic, variable in ((dW, W), (db, b), (dx, x)):
        assert relative_error(analytic, numerical_gradient(loss, variable)) < GRAD_TOL


def test_dense_relu_backward_matches_finite_differences(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    upstream = rng.standard_normal((5, 6))
    out = np.empty((5, 6))
    ref.dense_relu_forward(x, W, b, out)
    assert (out == 0).any() and (out > 0).any()

    def loss():
        perturbed = np.empty((5, 6))
        ref.dense_relu_forward(x, W, b, perturbed)
        return float(np.sum(perturbed * upstream))

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
    out = np.empty((5, 7))
    ref.dense_relu_forward(x, W, b, out)
    assert_close(out, np.maximum(x @ W + b, 0), rtol=1e-12)
    assert (out == 0).any() and (out > 0).any()


def test_relu_backward_matches_finite_differences(rng):
    # Keep inputs away from the kink at 0, where the derivative is undefined.
    x = rng.uniform(0.1, 1.0, (4, 6)) * rng.choice([-1.0, 1.0], (4, 6))
    upstream = rng.standard_normal((4, 6))

    def loss():
        return float(np.sum(np.maximum(x, 0) * upstream))

    dx = np.empty_like(x)
    ref.relu_backward(upstream, np.maximum(x, 0), dx)
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
    out = np.empty((4, 5), np.float32)
    ref.gather_normalize(images, indices, shift, scale, out)
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


# --- Other activations ---------------------------------------------------------------------------------

def away_from_zero(rng, shape):
    """Inputs at least 0.1 from 0, where the ReLUs have their kink and finite differences fail."""
    return rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


# The textbook functions, written out here as an independent reference; the kernels are called as
# fastnet.activations describes them.
TEXTBOOK = {
    "relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
}
assert set(TEXTBOOK) == set(ACTIVATIONS)


def forward(act, x, out):
    """The activation's forward kernel; returns out, which it wrote."""
    getattr(ref, act.forward)(x, *act.scalars, out)
    return out


def backward(act, dout, x, out, dx):
    """The activation's backward kernel; returns dx, which it wrote."""
    getattr(ref, act.backward)(dout, x if act.reads_input else out, *act.scalars, dx)
    return dx


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_forward_is_the_textbook_function(rng, name):
    act, textbook = ACTIVATIONS[name], TEXTBOOK[name]
    x = rng.standard_normal((6, 7)) * 3
    assert_close(forward(act, x, np.empty_like(x)), textbook(x), rtol=1e-12, atol=1e-15)
    in_place = x.copy()
    forward(act, in_place, in_place)
    assert_close(in_place, textbook(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("in_place", [False, True])
def test_activation_backward_matches_finite_differences(rng, name, in_place):
    act = ACTIVATIONS[name]
    x = away_from_zero(rng, (4, 6))
    upstream = rng.standard_normal((4, 6))

    def loss():
        return float(np.sum(forward(act, x, np.empty_like(x)) * upstream))

    out = forward(act, x, np.empty_like(x))
    dout = upstream.copy()
    dx = backward(act, dout, x, out, dout if in_place else np.empty_like(x))
    assert relative_error(dx, numerical_gradient(loss, x)) < GRAD_TOL


def test_gelu_is_close_to_the_exact_one(rng):
    """The tanh form is within 1e-3 of x * Phi(x), the exact GELU, everywhere."""
    from math import erf
    x = np.linspace(-6, 6, 241)
    exact = x * 0.5 * (1 + np.array([erf(v / np.sqrt(2)) for v in x]))
    assert np.max(np.abs(forward(ACTIVATIONS["gelu"], x, np.empty_like(x)) - exact)) < 1e-3


def dense_forward(act, x, W, b, pre, out):
    """The activation's dense forward kernel; returns out, which it wrote."""
    getattr(ref, act.dense_forward)(x, W, b, *act.scalars, *((pre,) if act.reads_input else ()), out)
    return out


def dense_backward(act, dout, pre, out, x, W, dW, db, dx):
    getattr(ref, act.dense_backward)(dout, pre if act.reads_input else out, x, W, *act.scalars, dW, db, dx)


# ReLU: test_dense_relu_backward_matches_finite_differences
@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "gelu"])
@pytest.mark.parametrize("batch, fan_in, fan_out", [(1, 1, 1), (5, 4, 6)])
def test_dense_activation_backward_matches_finite_differences(rng, name, batch, fan_in, fan_out):
    act = ACTIVATIONS[name]
    x, W = rng.standard_normal((batch, fan_in)), rng.standard_normal((fan_in, fan_out))
    b = rng.standard_normal(fan_out)
    upstream = rng.standard_normal((batch, fan_out))

    def loss():
        return float(np.sum(dense_forward(act, x, W, b, np.empty_like(upstream), np.empty_like(upstream)) * upstream))

    pre, out = np.empty_like(upstream), np.empty_like(upstream)
    dense_forward(act, x, W, b, pre, out)
    if act.reads_input:  # GELU, the only one that keeps its pre-activation for backward
        assert_close(pre, x @ W + b, rtol=1e-12, atol=1e-14)
    assert_close(out, TEXTBOOK[name](x @ W + b), rtol=1e-12, atol=1e-14)
    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    dense_backward(act, upstream.copy(), pre, out, x, W, dW, db, dx)
    for analytic, variable in ((dW, W), (db, b), (dx, x)):
        assert relative_error(analytic, numerical_gradient(loss, variable)) < GRAD_TOL


# --- Layer norm, dropout ------------------------------------------------------------------------------

def test_layernorm_forward_normalises_each_row(rng):
    x = rng.standard_normal((5, 9)) * 4 + 3
    gain, bias = rng.uniform(0.5, 2, 9), rng.standard_normal(9)
    xhat, inv_std, out = np.empty_like(x), np.empty(5), np.empty_like(x)
    ref.layernorm_forward(x, gain, bias, 1e-5, xhat, inv_std, out)
    assert_close(xhat.mean(axis=1), np.zeros(5), rtol=0, atol=1e-12)
    assert_close(xhat.var(axis=1), x.var(axis=1) / (x.var(axis=1) + 1e-5), rtol=1e-12)
    assert_close(inv_std, 1 / np.sqrt(x.var(axis=1) + 1e-5), rtol=1e-12)
    assert_close(out, xhat * gain + bias, rtol=1e-12)
    ref.layernorm_forward(x, gain, bias, 1e-5, xhat, inv_std, x)  # in place, as the model calls it
    assert_close(x, out, rtol=1e-12)


@pytest.mark.parametrize("batch, width", [(1, 1), (1, 5), (4, 6)])
@pytest.mark.parametrize("in_place", [False, True])
def test_layernorm_backward_matches_finite_differences(rng, batch, width, in_place):
    x = rng.standard_normal((batch, width)) * 2 + 1
    gain, bias = rng.uniform(0.5, 2, width), rng.standard_normal(width)
    upstream = rng.standard_normal((batch, width))

    def forward():
        xhat, inv_std, out = np.empty_like(x), np.empty(batch), np.empty_like(x)
        ref.layernorm_forward(x, gain, bias, 1e-5, xhat, inv_std, out)
        return out, xhat, inv_std

    def loss():
        return float(np.sum(forward()[0] * upstream))

    _, xhat, inv_std = forward()
    dgain, dbias = np.empty_like(gain), np.empty_like(bias)
    dout = upstream.copy()
    dx = dout if in_place else np.empty_like(x)
    ref.layernorm_backward(dout, xhat, inv_std, gain, dgain, dbias, dx)
    for analytic, variable in ((dgain, gain), (dbias, bias), (dx, x)):
        assert relative_error(analytic, numerical_gradient(loss, variable)) < GRAD_TOL


def test_dropout_drops_below_the_rate_and_scales_the_rest(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    uniform = np.array([[0.0, 0.25, 0.2499, 0.9]] * 3, np.float32)
    out = np.empty_like(x)
    ref.dropout(x, uniform, 0.25, out)
    keep = np.array([False, True, False, True])
    assert_close(out[:, keep], x[:, keep] / np.float32(0.75), rtol=1e-7)
    assert not out[:, ~keep].any()
    # It is its own backward: the gradient of sum(out * g) with respect to x is dropout(g).
    x64, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    u64 = uniform.astype(np.float64)

    def dropped(a):
        out = np.empty_like(a)
        ref.dropout(a, u64, 0.25, out)
        return out

    numeric = numerical_gradient(lambda: float(np.sum(dropped(x64) * g)), x64)
    assert relative_error(dropped(g), numeric) < GRAD_TOL


def splitmix64(seed, count):
    """The first `count` outputs of SplitMix64 from `seed`, written out from Vigna's splitmix64.c
    on Python integers."""
    outputs, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        outputs.append(z ^ (z >> 31))
    return outputs


def test_splitmix64_written_out_gives_the_published_outputs():
    assert splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                      4593380528125082431, 16408922859458223821]


@pytest.mark.parametrize("key", [0, 1234567, 2**64 - 1])
@pytest.mark.parametrize("dtype, bits", [(np.float32, 24), (np.float64, 53)])
def test_draw_uniform_is_the_top_bits_of_splitmix64_in_c_order(key, dtype, bits):
    out = np.full((3, 5), np.nan, dtype)
    ref.draw_uniform(np.uint64(key), 0, out)
    assert out.dtype == dtype
    assert out.ravel().tolist() == [(z >> (64 - bits)) * 2.0 ** -bits for z in splitmix64(key, 15)]
    share = np.full((2, 5), np.nan, dtype)  # rows 1 and 2 alone, as a data-parallel rank draws them
    ref.draw_uniform(np.uint64(key), 1, share)
    assert np.array_equal(share, out[1:])


def test_draw_uniform_is_uniform_and_each_key_draws_its_own_numbers():
    first, second = np.empty((400, 1000), np.float32), np.empty((400, 1000), np.float32)
    ref.draw_uniform(np.uint64(7), 0, first)
    ref.draw_uniform(np.uint64(8), 0, second)
    assert first.min() >= 0 and first.max() < 1
    counts = np.histogram(first, bins=20, range=(0, 1))[0] / first.size
    assert np.all(np.abs(counts - 0.05) < 0.002)  # 400,000 draws: a bin's standard error is 0.00034
    for a, b in [(first, second), (first[:, 1:], first[:, :-1]), (first[1:], first[:-1])]:  # keys, neighbours
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    assert np.mean(first == second) < 1e-4


def test_dropout_keeps_the_expected_value(rng):
    x = np.ones((200, 500), np.float32)
    out = np.empty_like(x)
    ref.dropout(x, rng.random(x.shape, dtype=np.float32), 0.3, out)
    assert out.mean() == pytest.approx(1.0, abs=0.01)
    assert np.mean(out == 0) == pytest.approx(0.3, abs=0.01)


# --- Label smoothing, gradient clipping ---------------------------------------------------------------

def naive_smoothed_cross_entropy(logits, labels, smoothing):
    """-sum_j q_j log softmax(logits)_j with q = (1 - smoothing) onehot + smoothing / K, averaged."""
    classes = logits.shape[1]
    log_probabilities = np.log(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    targets = np.full(logits.shape, smoothing / classes)
    targets[np.arange(len(labels)), labels] += 1 - smoothing
    return float(-np.mean(np.sum(targets * log_probabilities, axis=1)))


@pytest.mark.parametrize("batch, classes", [(1, 1), (1, 10), (6, 3), (13, 10)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.6])
def test_smoothed_cross_entropy_value_and_gradient(rng, batch, classes, smoothing):
    logits = rng.standard_normal((batch, classes)) * 3
    labels = rng.integers(0, classes, batch)
    dlogits = np.empty_like(logits)
    loss = ref.softmax_cross_entropy_smoothed(logits, labels, smoothing, dlogits)
    assert isinstance(loss, float)
    assert loss == pytest.approx(naive_smoothed_cross_entropy(logits, labels, smoothing), rel=1e-12, abs=1e-12)
    numeric = numerical_gradient(
        lambda: ref.softmax_cross_entropy_smoothed(logits, labels, smoothing, np.empty_like(logits)), logits)
    assert relative_error(dlogits, numeric) < GRAD_TOL


def test_smoothing_zero_is_the_plain_cross_entropy(rng):
    logits = (rng.standard_normal((9, 10)) * 5).astype(np.float32)
    labels = rng.integers(0, 10, 9)
    plain, smoothed = np.empty_like(logits), np.empty_like(logits)
    loss = ref.softmax_cross_entropy(logits, labels, plain)
    assert ref.softmax_cross_entropy_smoothed(logits, labels, 0.0, smoothed) == pytest.approx(loss, rel=1e-6)
    assert np.array_equal(plain, smoothed)


def test_smoothed_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5000.0, 5000.0, 0.0]], np.float32)
    dlogits = np.empty_like(logits)
    loss = ref.softmax_cross_entropy_smoothed(logits, np.array([2, 1]), 0.3, dlogits)
    # Targets 0.1 off the label and 0.8 on it; -log p is (0, 1000, 2000) and (10000, 0, 5000).
    assert loss == pytest.approx((0.1 * 1000 + 0.8 * 2000 + 0.1 * 10000 + 0.1 * 5000) / 2, rel=1e-6)
    assert np.isfinite(dlogits).all() and dlogits.dtype == np.float32


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3)])
def test_sum_of_squares(rng, shape):
    x = rng.standard_normal(shape)
    assert ref.sum_of_squares(x) == pytest.approx(float(np.sum(x ** 2)), rel=1e-12)
    assert type(ref.sum_of_squares(x.astype(np.float32))) is float
    strided = np.asfortranarray(rng.standard_normal((4, 3)))[:, ::2]
    assert ref.sum_of_squares(strided) == pytest.approx(float(np.sum(strided.astype(np.float64) ** 2)), rel=1e-12)


# --- bfloat16 operands ---------------------------------------------------------------------------------

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
