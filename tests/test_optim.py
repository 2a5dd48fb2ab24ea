"""Schedules and the Optimizer object (the update rules themselves are in test_kernels.py)."""

import numpy as np
import pytest

import fastnet
from fastnet.optim import OPTIMIZERS, Optimizer, Schedule
from helpers import assert_close


def lrs(kind, total=100, lr=1.0, warmup=None):
    schedule = Schedule(kind, lr, total, warmup)
    return np.array([schedule(step) for step in range(total)])


def test_constant_and_step():
    assert (lrs("constant") == 1.0).all()
    step = lrs("step")
    assert (step[:50] == 1.0).all()
    assert step[50:75] == pytest.approx(0.1) and step[75:] == pytest.approx(0.01)


def test_cosine_falls_from_lr_to_zero():
    cosine = lrs("cosine")
    assert cosine[0] == 1.0 and cosine[-1] < 1e-3
    assert (np.diff(cosine) <= 0).all()
    assert cosine[50] == pytest.approx(0.5, abs=0.02)


def test_onecycle_warms_up_then_anneals():
    cycle = lrs("onecycle")
    assert cycle[0] == pytest.approx(1 / 25)
    assert cycle.argmax() == 30 and cycle.max() == pytest.approx(1.0)
    assert (np.diff(cycle[:31]) > 0).all() and (np.diff(cycle[30:]) <= 0).all()
    assert cycle[-1] < 1e-3


def test_warmup_ramps_up_any_schedule():
    warm = lrs("cosine", warmup=0.1)
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert (np.diff(warm[:10]) > 0).all()


def test_learning_rates_are_python_floats():
    assert all(type(Schedule(kind, 0.1, 10)(3)) is float for kind in ("constant", "step", "cosine", "onecycle"))


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="unknown optimizer"):
        Optimizer([], "rmsprop")


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_weight_decay_shrinks_weight_matrices_and_spares_every_1d_parameter(kind):
    """With zero gradients only the decay moves anything. Biases and layer-norm gains and biases
    start non-zero here, so a decay applied to every parameter would move them."""
    net = fastnet.MLP([4, 3, 2], dtype="float64", norm="layernorm", seed=2)
    rng = np.random.default_rng(0)
    for p in net.params:
        if p.ndim == 1:
            p[...] = rng.uniform(0.5, 1.5, p.shape)
    before = [p.copy() for p in net.params]
    lr, decay, momentum = 0.1, 0.5, 0.9
    Optimizer(net.params, kind, momentum=momentum, weight_decay=decay).step(
        [np.zeros_like(p) for p in net.params], lr=lr)
    # What one step from zero state does to a weight w whose only gradient is the L2 term decay * w.
    expected = {"sgd": lambda w: w * (1 - lr * decay),        # decoupled: exactly this product
                "adamw": lambda w: w * (1 - lr * decay),      # decoupled; Adam's own step is 0 / eps
                "momentum": lambda w: w - lr * decay * w,
                "nesterov": lambda w: w - lr * (1 + momentum) * decay * w,
                # Adam's first step, bias-corrected: lr * g / (|g| + eps), almost lr towards 0
                "adam": lambda w: w - lr * (decay * w) / (np.abs(decay * w) + 1e-8)}
    for p, old in zip(net.params, before, strict=True):
        if p.ndim == 1:
            assert np.array_equal(p, old), f"{kind} moved a 1-D parameter"
        elif kind in ("sgd", "adamw"):
            assert np.array_equal(p, expected[kind](old)), f"{kind}: not exactly w * (1 - lr * wd)"
        else:
            assert_close(p, expected[kind](old), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["momentum", "adamw"])
def test_state_round_trips(kind):
    net = fastnet.MLP([4, 3, 2], seed=1)
    optimizer = Optimizer(net.params, kind)
    rng = np.random.default_rng(0)
    for _ in range(3):
        optimizer.step([rng.standard_normal(p.shape).astype(np.float32) for p in net.params], lr=0.01)
    saved = {k: v.copy() for k, v in optimizer.state_arrays().items()}
    restored = Optimizer(fastnet.MLP([4, 3, 2], seed=1).params, kind)
    restored.load_state_arrays(saved)
    assert restored.steps_taken == 3
    for name, group in optimizer.state.items():
        assert all(np.array_equal(a, b) for a, b in zip(group, restored.state[name], strict=True))
        assert any(a.any() for a in group)
