"""The NumPy reference backend: every kernel of fastnet as plain, readable array code.

This module defines the kernel interface. Each function works on arrays only and, where a result is
an array, writes it into an output that the caller allocated once and reuses (`out`, `dx`, `dW` ...),
so that a training step allocates as little as NumPy allows. Shapes use B for the batch, D for input
features, H for output features and K for classes. Every array of one call shares the model's dtype
(float32 for training, float64 for gradient checks); scalars arrive as Python floats, which NumPy
treats as "weak" and never uses to upcast float32 arrays.

The Numba backend mirrors this module name for name; tests compare the two.
"""

import numpy as np

NAME = "numpy"


# --- Data ------------------------------------------------------------------------------------------

def gather_normalize(images, indices, shift, scale, out):
    """out[i] = (images[indices[i]] - shift) * scale, for images (N, D) uint8 or float and shift,
    scale (D,). Only the minibatch is converted, so the training set itself stays uint8."""
    np.subtract(images[indices], shift, out=out)
    np.multiply(out, scale, out=out)
    return out


# --- Dense layer -----------------------------------------------------------------------------------

def dense_forward(x, W, b, out):
    """out = x @ W + b, with x (B, D), W (D, H), b (H,), out (B, H)."""
    np.matmul(x, W, out=out)
    out += b
    return out


def dense_relu_forward(x, W, b, out):
    """out = max(x @ W + b, 0): the hidden layers' forward pass, bias and activation fused."""
    dense_forward(x, W, b, out)
    np.maximum(out, 0, out=out)
    return out


def dense_backward(dout, x, W, dW, db, dx):
    """Gradients of out = x @ W + b given dout = dLoss/dout (B, H).

    Writes dW = x.T @ dout (D, H) and db = sum of dout over the batch (H,). dx = dout @ W.T (B, D)
    is written only when dx is not None: the first layer's input gradient is never needed, and
    skipping it saves a third of that layer's work.
    """
    np.matmul(x.T, dout, out=dW)
    np.sum(dout, axis=0, out=db)
    if dx is not None:
        np.matmul(dout, W.T, out=dx)


def dense_relu_backward(dout, out, x, W, dW, db, dx):
    """Gradients of out = relu(x @ W + b): dout is first masked in place where the ReLU's output was
    0 (so it becomes dLoss/d(x @ W + b)), then everything proceeds as in dense_backward."""
    relu_backward(dout, out, dout)
    dense_backward(dout, x, W, dW, db, dx)


def relu_backward(dout, out, dx):
    """dx = dout where the ReLU's output was positive, else 0. Uses the forward output, not its
    input, so the forward pass need not keep the pre-activation. dx may be dout itself."""
    np.multiply(dout, out > 0, out=dx)
    return dx


# --- Loss ------------------------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy of logits (B, K) against integer labels (B,).

    Returns the loss as a Python float and writes dlogits = (softmax(logits) - onehot(labels)) / B,
    the gradient of that mean. Subtracting each row's maximum first keeps exp() from overflowing;
    the loss uses log-sum-exp so it never takes the log of an underflowed probability.
    """
    batch = logits.shape[0]
    rows = np.arange(batch)
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=dlogits)
    correct_shifted = dlogits[rows, labels]
    np.exp(dlogits, out=dlogits)
    sums = dlogits.sum(axis=1)
    loss = float(np.mean(np.log(sums) - correct_shifted))
    dlogits /= sums[:, None]
    dlogits[rows, labels] -= 1
    dlogits /= batch
    return loss


def count_correct(logits, labels):
    """How many rows of logits (B, K) have their largest value at the label's position."""
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


# --- Optimizer updates -----------------------------------------------------------------------------
# Each step updates the parameter and its state in place. weight_decay is the L2 coefficient added to
# the gradient (decoupled from it for AdamW), so 0 switches it off.

def sgd_step(param, grad, lr, weight_decay):
    """param -= lr * (grad + weight_decay * param)."""
    if weight_decay:
        param *= 1 - lr * weight_decay
    param -= lr * grad


def momentum_step(param, grad, velocity, lr, momentum, weight_decay):
    """Heavy-ball momentum as PyTorch defines it: v = momentum * v + g; param -= lr * v."""
    velocity *= momentum
    velocity += grad
    if weight_decay:
        velocity += weight_decay * param
    param -= lr * velocity


def nesterov_step(param, grad, velocity, lr, momentum, weight_decay):
    """Nesterov momentum in PyTorch's form: v = momentum * v + g; param -= lr * (g + momentum * v)."""
    if weight_decay:
        grad = grad + weight_decay * param
    velocity *= momentum
    velocity += grad
    param -= lr * (grad + momentum * velocity)


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Adam with bias correction; step counts from 1. weight_decay is L2 added to the gradient."""
    if weight_decay:
        grad = grad + weight_decay * param
    _adam_moments_and_update(param, grad, m, v, lr, beta1, beta2, eps, step)


def adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW: Adam whose weight decay shrinks the parameter directly instead of entering the moments."""
    if weight_decay:
        param *= 1 - lr * weight_decay
    _adam_moments_and_update(param, grad, m, v, lr, beta1, beta2, eps, step)


def _adam_moments_and_update(param, grad, m, v, lr, beta1, beta2, eps, step):
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(v / (1 - beta2 ** step)) + eps
    param -= step_size * m / denom
