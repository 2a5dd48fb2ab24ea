"""The Numba backend: the reference kernels of numpy_backend.py as JIT-compiled loops, name for name.

What it does that NumPy cannot:
- fuses the passes NumPy makes one at a time: the bias and ReLU run as the epilogue of the forward
  GEMM, the ReLU mask and the bias-gradient column sums share one pass in backward, and each
  optimizer step is one loop over the parameter;
- writes every result into the caller's arrays, so a training step allocates nothing;
- keeps float32 arithmetic in float32: a Python float in Numba code is a float64, so scalars are
  first converted with `array.dtype.type(...)`, which also keeps float64 models in float64;
- divides as NumPy does (`error_model="numpy"`: inf or nan, no ZeroDivisionError). Numba's default
  checks every division for zero, and that branch kept the Adam loop from vectorising: 7x slower.

The GEMMs call BLAS through `np.dot(a, b, out)`, with transposes as views, and BLAS uses both
cores. The loops around them are serial, on purpose: they are short and memory-bound, and
running them with Numba's own threads (`parallel=True`) made a training step three times slower.
After every BLAS call OpenBLAS's threads keep spinning for a while, so the two thread pools fought
over the two cores. Serial loops also keep every sum in a fixed order, so results never depend on
thread timing. Compiled code is cached on disk (`cache=True`), so a second process starts warm.
"""

import os

if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
    # Numba caches next to the source by default; an installed, read-only package needs elsewhere.
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastnet", "numba")

import numpy as np  # noqa: E402
import scipy.linalg.cython_blas  # noqa: E402, F401  (the BLAS np.dot calls in Numba code; loaded now,
from numba import njit  # noqa: E402                  so that a thread limit set after import reaches it)

NAME = "numba"


# --- Data ------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def gather_normalize(images, indices, shift, scale, out):
    """out[i] = (images[indices[i]] - shift) * scale, converting each row as it is copied."""
    to_float = out.dtype.type
    for i in range(indices.shape[0]):
        row = images[indices[i]]
        for j in range(out.shape[1]):
            out[i, j] = (to_float(row[j]) - shift[j]) * scale[j]
    return out


# --- Dense layer -----------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def dense_forward(x, W, b, out):
    """out = x @ W + b: BLAS for the product, then the bias added in one pass."""
    np.dot(x, W, out)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += b[j]
    return out


@njit(cache=True, error_model="numpy")
def dense_relu_forward(x, W, b, out):
    """out = max(x @ W + b, 0), the bias and ReLU fused into one pass after the GEMM."""
    np.dot(x, W, out)
    zero = out.dtype.type(0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = max(out[i, j] + b[j], zero)
    return out


@njit(cache=True, error_model="numpy")
def dense_backward(dout, x, W, dW, db, dx):
    """dW = x.T @ dout, db = column sums of dout, and dx = dout @ W.T unless dx is None."""
    db[:] = 0
    for i in range(dout.shape[0]):
        for j in range(dout.shape[1]):
            db[j] += dout[i, j]
    _weight_and_input_grads(dout, x, W, dW, dx)


@njit(cache=True, error_model="numpy")
def dense_relu_backward(dout, out, x, W, dW, db, dx):
    """dense_backward behind a ReLU: masks dout in place where out is 0 and sums the columns for db
    in the same pass, then the two GEMMs."""
    db[:] = 0
    zero = dout.dtype.type(0)
    for i in range(dout.shape[0]):
        for j in range(dout.shape[1]):
            if out[i, j] > zero:
                db[j] += dout[i, j]
            else:
                dout[i, j] = zero
    _weight_and_input_grads(dout, x, W, dW, dx)


@njit(cache=True, error_model="numpy")
def _weight_and_input_grads(dout, x, W, dW, dx):
    np.dot(x.T, dout, dW)
    if dx is not None:
        np.dot(dout, W.T, dx)


@njit(cache=True, error_model="numpy")
def relu_backward(dout, out, dx):
    """dx = dout where out > 0, else 0; dx may be dout itself."""
    zero = dout.dtype.type(0)
    for i in range(dout.shape[0]):
        for j in range(dout.shape[1]):
            dx[i, j] = dout[i, j] if out[i, j] > zero else zero
    return dx


# --- Loss ------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def softmax_cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy and its gradient, one row at a time: the row's maximum, then its
    exponentials and their sum, then the normalised gradient. The mean loss is summed in float64,
    a scalar that never touches an array."""
    batch, classes = logits.shape
    real = dlogits.dtype.type
    total = 0.0
    for i in range(batch):
        top = logits[i, 0]
        for j in range(1, classes):
            top = max(top, logits[i, j])
        row_sum = real(0)
        for j in range(classes):
            e = np.exp(logits[i, j] - top)
            dlogits[i, j] = e
            row_sum += e
        total += np.log(row_sum) - (logits[i, labels[i]] - top)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / row_sum
        dlogits[i, labels[i]] -= real(1)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / real(batch)
    return total / batch


@njit(cache=True, error_model="numpy")
def count_correct(logits, labels):
    """Rows whose first largest logit is at the label, as np.argmax breaks ties."""
    correct = 0
    for i in range(logits.shape[0]):
        best = 0
        for j in range(1, logits.shape[1]):
            if logits[i, j] > logits[i, best]:
                best = j
        correct += best == labels[i]
    return correct


# --- Optimizer updates -----------------------------------------------------------------------------
# One loop per parameter. Parameters and state are C-contiguous (the model and optimizer
# allocate them so), so reshape(-1) is a view; np.ravel copies only a gradient that is not.

@njit(cache=True, error_model="numpy")
def sgd_step(param, grad, lr, weight_decay):
    """param -= lr * (grad + weight_decay * param)."""
    p, g = param.reshape(-1), np.ravel(grad)
    real = param.dtype.type
    # As in the reference, the factor is computed in double and rounded once.
    shrink, lr = real(1.0 - lr * weight_decay), real(lr)
    for i in range(p.size):
        p[i] = p[i] * shrink - lr * g[i]


@njit(cache=True, error_model="numpy")
def momentum_step(param, grad, velocity, lr, momentum, weight_decay):
    """v = momentum * v + grad + weight_decay * param; param -= lr * v."""
    p, g, v = param.reshape(-1), np.ravel(grad), velocity.reshape(-1)
    real = param.dtype.type
    lr, momentum, decay = real(lr), real(momentum), real(weight_decay)
    for i in range(p.size):
        v[i] = v[i] * momentum + g[i] + decay * p[i]
        p[i] -= lr * v[i]


@njit(cache=True, error_model="numpy")
def nesterov_step(param, grad, velocity, lr, momentum, weight_decay):
    """g' = grad + weight_decay * param; v = momentum * v + g'; param -= lr * (g' + momentum * v)."""
    p, g, v = param.reshape(-1), np.ravel(grad), velocity.reshape(-1)
    real = param.dtype.type
    lr, momentum, decay = real(lr), real(momentum), real(weight_decay)
    for i in range(p.size):
        gi = g[i] + decay * p[i]
        v[i] = v[i] * momentum + gi
        p[i] -= lr * (gi + momentum * v[i])


@njit(cache=True, error_model="numpy")
def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Adam with bias correction and L2 weight decay added to the gradient."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, 0.0, step)


@njit(cache=True, error_model="numpy")
def adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW: the weight decay shrinks the parameter instead of entering the moments."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, 0.0, weight_decay, step)


@njit(cache=True, error_model="numpy")
def _adam(param, grad, first_moment, second_moment, lr, beta1, beta2, eps, l2_decay, decoupled_decay, step):
    p, g = param.reshape(-1), np.ravel(grad)
    m, v = first_moment.reshape(-1), second_moment.reshape(-1)
    real = param.dtype.type
    # Factors are computed in double and rounded once, as the reference's Python floats are.
    b1, b2, tiny, l2 = real(beta1), real(beta2), real(eps), real(l2_decay)
    keep1, keep2 = real(1.0 - beta1), real(1.0 - beta2)
    shrink = real(1.0 - lr * decoupled_decay)
    step_size = real(lr / (1 - beta1 ** step))
    correction2 = real(1 - beta2 ** step)
    for i in range(p.size):
        gi = g[i] + l2 * p[i]
        m[i] = m[i] * b1 + keep1 * gi
        v[i] = v[i] * b2 + keep2 * gi * gi
        p[i] = p[i] * shrink - step_size * m[i] / (np.sqrt(v[i] / correction2) + tiny)
