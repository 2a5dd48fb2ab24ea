"""The Numba backend's parameter update: the sum of squares that gradient clipping reads, the
optimizers' steps, and the step of the weights' moving average (--ema).

Each kernel is an entry that flattens its arrays and computes its rule's factors, and one tile loop
(_update_tiles) whose element update is chosen at compile time: the rule is a literal, as the dense
kernels' activation is. Every array arrives C-contiguous, so reshape(-1) and np.ravel are views. A rule
without a state gets the parameter in its place, never written. The bf16 copy, when given, is
written from each tile once it is updated. (The entry flattens it: flattened inside the parallel
function, by a helper, Numba's parfors dropped the writes to it.)
"""

import numpy as np
from numba import literally, njit, prange
from numba.extending import overload

from fastnet.backends.numba_bf16 import round_row
from fastnet.backends.numba_contiguous import on_contiguous
from fastnet.backends.numba_gemm import ALIGN_COLUMNS, column_tiles, next_tile, span, thread_count, tile_counter

# --- Gradient clipping -----------------------------------------------------------------------------


@on_contiguous()
@njit(cache=True, nogil=True, error_model="numpy")
def sum_of_squares(x):
    """The sum of x's squared elements as a float: BLAS's dot of x with itself, as in the reference,
    which reads the array once at memory speed."""
    flat = np.ravel(x)
    return float(np.dot(flat, flat))


# --- Optimizer updates -----------------------------------------------------------------------------


SGD, MOMENTUM, NESTEROV, ADAM, EMA = range(5)


def _update_run(rule, p, g, s1, s2, f):
    """One update of `rule` of every element of the run p (with its gradient g and states s1, s2),
    with its factors f (the entries below say what they are)."""


@overload(_update_run, jit_options={"cache": True, "nogil": True, "error_model": "numpy"})
def _update_run_compiled(rule, p, g, s1, s2, f):
    # Chosen while typing, by the literal rule: each rule's factors are a tuple of their own length. A
    # loop over whole arrays (a run's views, passed in) is one LLVM vectorises; indexing views made in
    # the parallel loop left it a third slower.
    rule = getattr(rule, "literal_value", None)
    if rule == SGD:
        def sgd(rule, p, g, s1, s2, f):
            for i in range(p.size):
                p[i] = p[i] * f[0] - f[1] * g[i]
        return sgd
    if rule == MOMENTUM:
        def momentum(rule, p, g, s1, s2, f):
            for i in range(p.size):
                s1[i] = s1[i] * f[1] + g[i] + f[2] * p[i]
                p[i] -= f[0] * s1[i]
        return momentum
    if rule == NESTEROV:
        def nesterov(rule, p, g, s1, s2, f):
            for i in range(p.size):
                gi = g[i] + f[2] * p[i]
                s1[i] = s1[i] * f[1] + gi
                p[i] -= f[0] * (gi + f[1] * s1[i])
        return nesterov
    if rule == ADAM:
        def adam(rule, p, g, s1, s2, f):
            for i in range(p.size):
                gi = g[i] + f[3] * p[i]
                s1[i] = s1[i] * f[0] + f[4] * gi
                s2[i] = s2[i] * f[1] + f[5] * gi * gi
                p[i] = p[i] * f[6] - f[7] * s1[i] / (np.sqrt(s2[i] / f[8]) + f[2])
        return adam
    if rule == EMA:  # p is the average, g the parameter it follows
        def ema(rule, p, g, s1, s2, f):
            for i in range(p.size):
                p[i] += f[0] * (g[i] - p[i])
        return ema
    return None


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _update_tiles(rule, p, g, s1, s2, factors, p16):
    """Every element's update of `rule`, in runs of the flat parameter that the threads claim as they
    come free (numba_gemm.next_tile); a run's bounds depend on the size alone."""
    rule = literally(rule)
    tiles, counter = column_tiles(1, p.size), tile_counter()
    for _ in prange(thread_count()):
        tile = next_tile(counter, tiles)
        while tile >= 0:
            start, stop = span(p.size, tiles, tile, ALIGN_COLUMNS)
            _update_run(rule, p[start:stop], g[start:stop], s1[start:stop], s2[start:stop], factors)
            if p16 is not None:
                round_row(p[start:stop], p16[start:stop])
            tile = next_tile(counter, tiles)


@on_contiguous("param", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def sgd_step(param, grad, lr, weight_decay, param16=None):
    """param -= lr * (grad + weight_decay * param)."""
    real = param.dtype.type
    # As in the reference, the factor is computed in double and rounded once.
    factors = real(1.0 - lr * weight_decay), real(lr)
    p = param.reshape(-1)
    if param16 is None:
        _update_tiles(SGD, p, np.ravel(grad), p, p, factors, None)
    else:
        _update_tiles(SGD, p, np.ravel(grad), p, p, factors, param16.reshape(-1))


@on_contiguous("param", "velocity", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def momentum_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """v = momentum * v + grad + weight_decay * param; param -= lr * v."""
    real = param.dtype.type
    factors = real(lr), real(momentum), real(weight_decay)
    p, v = param.reshape(-1), velocity.reshape(-1)
    if param16 is None:
        _update_tiles(MOMENTUM, p, np.ravel(grad), v, v, factors, None)
    else:
        _update_tiles(MOMENTUM, p, np.ravel(grad), v, v, factors, param16.reshape(-1))


@on_contiguous("param", "velocity", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def nesterov_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """g' = grad + weight_decay * param; v = momentum * v + g'; param -= lr * (g' + momentum * v)."""
    real = param.dtype.type
    factors = real(lr), real(momentum), real(weight_decay)
    p, v = param.reshape(-1), velocity.reshape(-1)
    if param16 is None:
        _update_tiles(NESTEROV, p, np.ravel(grad), v, v, factors, None)
    else:
        _update_tiles(NESTEROV, p, np.ravel(grad), v, v, factors, param16.reshape(-1))


@on_contiguous("param", "m", "v", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """Adam with bias correction and L2 weight decay added to the gradient."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, 0.0, step, param16)


@on_contiguous("param", "m", "v", "param16")
@njit(cache=True, nogil=True, error_model="numpy")
def adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """AdamW: the weight decay shrinks the parameter instead of entering the moments."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, 0.0, weight_decay, step, param16)


@njit(cache=True, nogil=True, error_model="numpy")
def _adam(param, grad, m, v, lr, beta1, beta2, eps, l2_decay, decoupled_decay, step, param16):
    """The update of adam_step and adamw_step, as numpy_backend's _adam: l2_decay * param joins the
    gradient, decoupled_decay shrinks the parameter (each step passes 0 for the other)."""
    real = param.dtype.type
    # Factors are computed in double and rounded once, as the reference's Python floats are.
    factors = (real(beta1), real(beta2), real(eps), real(l2_decay), real(1.0 - beta1), real(1.0 - beta2),
               real(1.0 - lr * decoupled_decay), real(lr / (1 - beta1 ** step)), real(1 - beta2 ** step))
    p, g, m1, v1 = param.reshape(-1), np.ravel(grad), m.reshape(-1), v.reshape(-1)
    if param16 is None:
        _update_tiles(ADAM, p, g, m1, v1, factors, None)
    else:
        _update_tiles(ADAM, p, g, m1, v1, factors, param16.reshape(-1))


# --- Weight averaging ------------------------------------------------------------------------------


@on_contiguous("average")
@njit(cache=True, nogil=True, error_model="numpy")
def ema_update(average, param, decay):
    """average += (1 - decay) * (param - average): one step of the moving average, in the optimizers'
    runs, with the average in the parameter's place and the parameter in the gradient's."""
    real = average.dtype.type
    factors = (real(1.0 - decay),)  # computed in double and rounded once, as the reference's
    a = average.reshape(-1)
    _update_tiles(EMA, a, np.ravel(param), a, a, factors, None)
