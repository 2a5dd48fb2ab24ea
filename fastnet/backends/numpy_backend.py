"""The NumPy reference backend: every kernel of fastnet as plain, readable array code.

This module defines the kernel interface. Each function works on arrays only. A kernel writes every
array it computes into an output that the caller allocated once and reuses (`out`, `dx`, `dW` ...),
or updates its arguments in place, and returns None; only a kernel whose result is a number (a loss,
a count of correct predictions, a sum of squares) returns it, as a Python float or int. So a
training step allocates as little as NumPy allows, and a caller reads each result from the one place
every backend must put it, the array it passed. Shapes use B for the batch, D for input
features, H for output features and K for classes. Every array of one call shares the model's dtype
(float32 for training, float64 for gradient checks); scalars arrive as Python floats, which NumPy
treats as "weak" and never uses to upcast float32 arrays.

Mixed precision (`--precision bf16`) changes no kernel's arithmetic, only its operands: a GEMM's two
inputs may be bfloat16, held in uint16 arrays (each element the top 16 bits of a float32, see
round_to_bf16), and are then multiplied as their exact float32 values, with float32 sums and a float32
output. Kernels whose output feeds the next GEMM take an optional `out16` (forward) or `dout16`
(backward) and write it in the same pass; the optimizer steps take `param16`, the weight's bf16 copy.

The Numba backend mirrors this module name for name; tests compare the two.
"""

import numpy as np

NAME = "numpy"


# --- Data ------------------------------------------------------------------------------------------

def gather_normalize(images, indices, shift, scale, out, out16=None):
    """out[i] = (images[indices[i]] - shift) * scale, for images (N, D) uint8 or float and shift,
    scale (D,). Only the minibatch is converted, so the training set itself stays uint8. out16, as
    for every kernel that writes a batch the first GEMM reads, gets out rounded to bfloat16."""
    np.subtract(images[indices], shift, out=out)
    np.multiply(out, scale, out=out)
    _write_bf16(out, out16)


def gather_flip_components(inputs, indices, flips, signs, out, out16=None):
    """out[i] = inputs[indices[i]], times `signs` (D,) where flips[i] (B,) is nonzero. For images
    stored as components that are each mirror-symmetric (sign +1) or antisymmetric (-1), as
    `fastnet train --pca --flip` stores them, that is a left-right flip of the image."""
    one = signs.dtype.type(1)
    np.multiply(inputs[indices], np.where(flips[:, None] != 0, signs, one), out=out)
    _write_bf16(out, out16)


def augment_gather_normalize(images, indices, flips, offsets, cutout_centres, cutout_size, shift, scale, out,
                             out16=None):
    """gather_normalize for channel-last images (N, H, W, C), each one flipped, translated and cut out
    on its way into out (B, H*W*C), as the caller's per-sample random draws say:

    flips (B,) integers: nonzero mirrors the image left to right;
    offsets (B, 2) integers (dy, dx): the content moves dy rows down and dx columns right (negative:
        up, left), and what comes in from beyond the border is padding;
    cutout_centres (B, 2) integers (cy, cx): the centre of a cutout_size x cutout_size square that is
        blanked, rows cy - cutout_size // 2 onwards, clipped at the border; cutout_size 0 blanks nothing.

    The flip comes first, then the translation, then cutout. Padding and cutout write 0, which is what
    a pixel equal to `shift` (the training mean) normalises to, so they add no signal. shift and scale
    are per output feature, as in gather_normalize.
    """
    batch = len(indices)
    height, width, channels = images.shape[1:]
    rows = np.arange(height) - offsets[:, 0:1]     # (B, H): the source row of each output row
    cols = np.arange(width) - offsets[:, 1:2]      # (B, W): the column in the flipped image
    cols = np.where(flips[:, None] != 0, width - 1 - cols, cols)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]

    top = cutout_centres[:, 0:1] - cutout_size // 2
    left = cutout_centres[:, 1:2] - cutout_size // 2
    cut_rows = (np.arange(height) >= top) & (np.arange(height) < top + cutout_size)
    cut_cols = (np.arange(width) >= left) & (np.arange(width) < left + cutout_size)
    cut = cut_rows[:, :, None] & cut_cols[:, None, :]

    pixels = images[indices[:, None, None], np.clip(rows, 0, height - 1)[:, :, None],
                    np.clip(cols, 0, width - 1)[:, None, :]]          # (B, H, W, C)
    normalized = (pixels - shift.reshape(height, width, channels)) * scale.reshape(height, width, channels)
    normalized[~inside | cut] = 0
    out[...] = normalized.reshape(batch, -1)
    _write_bf16(out, out16)


# --- bfloat16 --------------------------------------------------------------------------------------
# bfloat16 keeps float32's sign and 8 exponent bits and 7 of its 23 mantissa bits, so a float32's top
# 16 bits are a bf16 number, and a bf16 number padded with 16 zero bits is its exact float32 value.
# The rounding's bit patterns, which numba_bf16.to_bf16 applies one value at a time:
BF16_ROUNDING_BIAS = 0x7FFF     # one half of the dropped 16 bits, less one
FLOAT32_MAGNITUDE = 0x7FFFFFFF  # every bit but the sign
FLOAT32_INF = 0x7F800000        # the magnitude of inf; a NaN's is greater
BF16_QUIET_BIT = 0x40           # the top bit of bf16's mantissa: set, it makes a NaN quiet


def round_to_bf16(x, out16):
    """out16 (uint16) = the bfloat16 nearest to each element of the float32 array x, ties to even.

    Adding 0x7FFF plus the lowest kept bit to the bits carries into the top half exactly when the
    dropped half is more than one half, or one half with an odd top half. Overflow gives inf, as
    IEEE rounding does; subnormals round like any other number. A NaN would carry into the exponent
    and could become inf, so it is truncated instead, with its quiet bit (0x40) set.
    """
    bits = np.asarray(x, np.float32).view(np.uint32)
    rounded = (bits + (BF16_ROUNDING_BIAS + ((bits >> 16) & 1))) >> 16
    nan = (bits & FLOAT32_MAGNITUDE) > FLOAT32_INF
    out16[...] = np.where(nan, (bits >> 16) | BF16_QUIET_BIT, rounded)


def bf16_to_float32(x16, out):
    """out = the exact float32 value of each bfloat16 in x16 (uint16)."""
    out[...] = (x16.astype(np.uint32) << 16).view(np.float32)


def _values(a):
    """A GEMM operand as numbers: a itself, or the float32 values of a bfloat16 (uint16) array."""
    if a.dtype != np.uint16:
        return a
    values = np.empty(a.shape, np.float32)
    bf16_to_float32(a, values)
    return values


def _write_bf16(out, out16):
    """The bf16 copy of a kernel's output, when the caller asked for one."""
    if out16 is not None:
        round_to_bf16(out, out16)


# --- Dense layer -----------------------------------------------------------------------------------

def dense_forward(x, W, b, out, out16=None):
    """out = x @ W + b, with x (B, D), W (D, H), b (H,), out (B, H). x and W may be bfloat16; out16,
    when given, gets out rounded to bfloat16, as every forward kernel's optional out16 does."""
    np.matmul(_values(x), _values(W), out=out)
    out += b
    _write_bf16(out, out16)


def dense_relu_forward(x, W, b, out, out16=None):
    """out = max(x @ W + b, 0): the hidden layers' forward pass, bias and activation fused."""
    dense_forward(x, W, b, out)
    np.maximum(out, 0, out=out)
    _write_bf16(out, out16)


def dense_backward(dout, x, W, dW, db, dx, dout16=None):
    """Gradients of out = x @ W + b given dout = dLoss/dout (B, H).

    Writes dW = x.T @ dout (D, H) and db = sum of dout over the batch (H,). dx = dout @ W.T (B, D)
    is written only when dx is not None: the first layer's input gradient is never needed, and
    skipping it saves a third of that layer's work.

    With bfloat16 x and W, dout16 (B, H) gets dout rounded to bfloat16, and the products use it; db
    sums dout itself, in float32.
    """
    operand = dout
    if dout16 is not None:
        round_to_bf16(dout, dout16)
        operand = _values(dout16)
    np.matmul(_values(x).T, operand, out=dW)
    np.sum(dout, axis=0, out=db)
    if dx is not None:
        np.matmul(operand, _values(W).T, out=dx)


def products(x, W, dout, out, dW, dx):
    """A dense layer's three products alone, as dense_forward and dense_backward compute them:
    out = x @ W, dW = x.T @ dout and, unless dx is None, dx = dout @ W.T. Not a kernel of the step:
    the yardstick a step's time is measured against (fastnet bench)."""
    np.matmul(x, W, out=out)
    np.matmul(x.T, dout, out=dW)
    if dx is not None:
        np.matmul(dout, W.T, out=dx)


def dense_relu_backward(dout, out, x, W, dW, db, dx, dout16=None):
    """Gradients of out = relu(x @ W + b): dout is first masked in place where the ReLU's output was
    0 (so it becomes dLoss/d(x @ W + b)), then everything proceeds as in dense_backward."""
    relu_backward(dout, out, dout)
    dense_backward(dout, x, W, dW, db, dx, dout16)


def relu_backward(dout, out, dx):
    """dx = dout where the ReLU's output was positive, else 0. Uses the forward output, not its
    input, so the forward pass need not keep the pre-activation. dx may be dout itself."""
    np.multiply(dout, out > 0, out=dx)


# --- Other activations -----------------------------------------------------------------------------
# Each activation has a forward and a backward kernel on its own (used after layer norm), and a dense
# forward and backward with the activation fused, as the ReLU has. The backward kernels take what
# the derivative is cheapest from: the output for leaky ReLU and tanh, the input for GELU.

def relu_forward(x, out, out16=None):
    """out = max(x, 0); out may be x."""
    np.maximum(x, 0, out=out)
    _write_bf16(out, out16)


def leaky_relu_forward(x, negative_slope, out, out16=None):
    """out = x where x > 0, else negative_slope * x; out may be x."""
    np.copyto(out, np.where(x > 0, x, x * negative_slope))
    _write_bf16(out, out16)


def leaky_relu_backward(dout, out, negative_slope, dx):
    """dx = dout where the output was positive, else negative_slope * dout. A slope in (0, 1) keeps
    the sign, so the output tells the side of the kink. dx may be dout."""
    np.copyto(dx, np.where(out > 0, dout, dout * negative_slope))


def dense_leaky_relu_forward(x, W, b, negative_slope, out, out16=None):
    """out = leaky_relu(x @ W + b)."""
    dense_forward(x, W, b, out)
    leaky_relu_forward(out, negative_slope, out, out16)


def dense_leaky_relu_backward(dout, out, x, W, negative_slope, dW, db, dx, dout16=None):
    """dense_backward behind a leaky ReLU whose output was `out`; dout is scaled in place first."""
    leaky_relu_backward(dout, out, negative_slope, dout)
    dense_backward(dout, x, W, dW, db, dx, dout16)


def tanh_forward(x, out, out16=None):
    """out = tanh(x); out may be x."""
    np.tanh(x, out=out)
    _write_bf16(out, out16)


def tanh_backward(dout, out, dx):
    """dx = dout * (1 - out**2), from tanh's output. dx may be dout."""
    np.multiply(dout, 1 - out * out, out=dx)


def dense_tanh_forward(x, W, b, out, out16=None):
    """out = tanh(x @ W + b)."""
    dense_forward(x, W, b, out)
    tanh_forward(out, out, out16)


def dense_tanh_backward(dout, out, x, W, dW, db, dx, dout16=None):
    """dense_backward behind a tanh whose output was `out`; dout is scaled in place first."""
    tanh_backward(dout, out, dout)
    dense_backward(dout, x, W, dW, db, dx, dout16)


# GELU in its tanh approximation (Hendrycks and Gimpel; PyTorch's approximate="tanh"):
# gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), within 1e-3 of x * Phi(x).
GELU_SQRT_2_OVER_PI = 0.7978845608028654
GELU_CUBIC = 0.044715


def gelu_forward(x, out, out16=None):
    """out = gelu(x), tanh approximation; out must not be x, which gelu_backward needs."""
    inner = GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * (x * x * x))
    np.multiply(0.5 * x, 1 + np.tanh(inner), out=out)
    _write_bf16(out, out16)


def gelu_backward(dout, x, dx):
    """dx = dout * gelu'(x), from the GELU's input x. dx may be dout."""
    t = np.tanh(GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * (x * x * x)))
    slope = 0.5 * (1 + t) + (0.5 * x) * (1 - t * t) * (GELU_SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * (x * x)))
    np.multiply(dout, slope, out=dx)


def dense_gelu_forward(x, W, b, pre, out, out16=None):
    """pre = x @ W + b and out = gelu(pre): the backward pass needs pre."""
    dense_forward(x, W, b, pre)
    gelu_forward(pre, out, out16)


def dense_gelu_backward(dout, pre, x, W, dW, db, dx, dout16=None):
    """dense_backward behind a GELU whose input was `pre`; dout is scaled in place first."""
    gelu_backward(dout, pre, dout)
    dense_backward(dout, x, W, dW, db, dx, dout16)


# --- Layer normalisation ---------------------------------------------------------------------------

def layernorm_forward(x, gain, bias, eps, xhat, inv_std, out):
    """Layer norm of each row of x (B, H): xhat = (x - mean) / sqrt(var + eps), out = xhat * gain + bias.

    Writes xhat (B, H) and inv_std = 1 / sqrt(var + eps) (B,), all that layernorm_backward needs, so
    out may be x. The variance is the population one (divided by H), as in PyTorch.
    """
    mean = x.mean(axis=1, keepdims=True)
    centred = x - mean
    variance = np.mean(centred * centred, axis=1)
    np.divide(1, np.sqrt(variance + eps), out=inv_std)
    np.multiply(centred, inv_std[:, None], out=xhat)
    np.multiply(xhat, gain, out=out)
    out += bias


def layernorm_backward(dout, xhat, inv_std, gain, dgain, dbias, dx):
    """Gradients of layernorm_forward given dout (B, H): dgain and dbias (H,) summed over the batch,
    and dx = inv_std * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * gain, the means taken
    over each row. dx may be dout."""
    np.sum(dout * xhat, axis=0, out=dgain)
    np.sum(dout, axis=0, out=dbias)
    g = dout * gain
    mean_g = g.mean(axis=1, keepdims=True)
    mean_g_xhat = (g * xhat).mean(axis=1, keepdims=True)
    np.multiply(g - mean_g - xhat * mean_g_xhat, inv_std[:, None], out=dx)


# --- Dropout ---------------------------------------------------------------------------------------

# Dropout's uniform numbers come from SplitMix64 (Steele, Lea and Flood 2014, as in Vigna's
# splitmix64.c): element n of stream `key` is mix(key + (n + 1) * gamma). Each number depends only
# on the key and its position, so every backend and every split of the rows across threads draws
# the same ones, and the step's generator gives one key per layer instead of a number per unit.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
SPLITMIX_SHIFTS = (30, 27, 31)


def draw_uniform(key, first_row, out):
    """out = numbers in [0, 1) of stream `key` (a uint64): rows first_row, first_row + 1, ... of the
    stream laid out as rows of out's width, so a share of a batch's rows draws what the whole batch
    does there. Element n of the stream, in C order, is SplitMix64's n-th output: its top 24 bits for
    float32, its top 53 for float64."""
    (m1, m2), (s1, s2, s3) = (np.uint64(m) for m in SPLITMIX_MULTIPLIERS), (np.uint64(s) for s in SPLITMIX_SHIFTS)
    first = first_row * (out.size // len(out) if len(out) else 0)  # rows before out's, times its row's size
    z = np.uint64(key) + (np.arange(first + 1, first + out.size + 1, dtype=np.uint64) * np.uint64(SPLITMIX_GAMMA))
    z = (z ^ (z >> s1)) * m1
    z = (z ^ (z >> s2)) * m2
    z ^= z >> s3
    bits = np.finfo(out.dtype).nmant + 1  # 24 or 53: every such number in [0, 1) is exact
    out[...] = ((z >> np.uint64(64 - bits)).astype(out.dtype) * out.dtype.type(2.0 ** -bits)).reshape(out.shape)


def dropout(x, uniform, rate, out, out16=None):
    """Inverted dropout: out = x / (1 - rate) where uniform >= rate, else 0.

    `uniform` (same shape as x) holds numbers in [0, 1), which the caller draws (the model with
    draw_uniform), so every backend drops the same units. The backward pass is the same call on the
    gradient, with the same uniform numbers. out may be x.
    """
    np.multiply(x, uniform >= rate, out=out)  # rate is compared as uniform's dtype (NumPy 2's rule)
    out *= 1 / (1 - rate)
    _write_bf16(out, out16)


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


def softmax_cross_entropy_smoothed(logits, labels, smoothing, dlogits):
    """softmax_cross_entropy against label-smoothed targets q = (1 - smoothing) * onehot + smoothing / K.

    The loss per row is -sum_j q_j log p_j = logsumexp(logits) - (1 - smoothing) * logit[label]
    - smoothing * mean(logits), and dlogits = (softmax(logits) - q) / B. smoothing 0 gives the same
    numbers as softmax_cross_entropy, which stays the kernel for that case.
    """
    batch, classes = logits.shape
    rows = np.arange(batch)
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=dlogits)
    correct_shifted = dlogits[rows, labels]
    mean_shifted = dlogits.mean(axis=1)
    np.exp(dlogits, out=dlogits)
    sums = dlogits.sum(axis=1)
    row_losses = np.log(sums) - (1 - smoothing) * correct_shifted - smoothing * mean_shifted
    loss = float(np.mean(row_losses))
    dlogits /= sums[:, None]
    dlogits -= smoothing / classes
    dlogits[rows, labels] -= 1 - smoothing
    dlogits /= batch
    return loss


def count_correct(logits, labels):
    """How many rows of logits (B, K) have their largest value at the label's position."""
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


# --- Gradient clipping -----------------------------------------------------------------------------

def sum_of_squares(x):
    """The sum of the squares of x's elements, as a Python float.

    For clipping by global norm: norm = sqrt(sum of sum_of_squares(g) over the gradients), and when
    norm > max_norm every gradient is scaled in place, g *= max_norm / norm (MLP.clip_grad_norm).
    """
    flat = x.ravel()
    return float(np.dot(flat, flat))


# --- Optimizer updates -----------------------------------------------------------------------------
# Each step updates the parameter and its state in place. weight_decay is the L2 coefficient added to
# the gradient (decoupled from it for AdamW), so 0 switches it off. param16, when given, is the
# parameter's bfloat16 copy (mixed precision), rewritten from the updated parameter.

def sgd_step(param, grad, lr, weight_decay, param16=None):
    """param -= lr * (grad + weight_decay * param)."""
    if weight_decay:
        param *= 1 - lr * weight_decay
    param -= lr * grad
    _write_bf16(param, param16)


def momentum_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """Heavy-ball momentum as PyTorch defines it: v = momentum * v + g; param -= lr * v."""
    velocity *= momentum
    velocity += grad
    if weight_decay:
        velocity += weight_decay * param
    param -= lr * velocity
    _write_bf16(param, param16)


def nesterov_step(param, grad, velocity, lr, momentum, weight_decay, param16=None):
    """Nesterov momentum in PyTorch's form: v = momentum * v + g; param -= lr * (g + momentum * v)."""
    if weight_decay:
        grad = grad + weight_decay * param
    velocity *= momentum
    velocity += grad
    param -= lr * (grad + momentum * velocity)
    _write_bf16(param, param16)


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """Adam with bias correction; step counts from 1. weight_decay is L2 added to the gradient."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, 0.0, step, param16)


def adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, param16=None):
    """AdamW: Adam whose weight decay shrinks the parameter directly instead of entering the moments."""
    _adam(param, grad, m, v, lr, beta1, beta2, eps, 0.0, weight_decay, step, param16)


def _adam(param, grad, m, v, lr, beta1, beta2, eps, l2_decay, decoupled_decay, step, param16):
    """The update of adam_step and adamw_step, which differ only in where the weight decay goes:
    l2_decay * param joins the gradient, decoupled_decay shrinks the parameter (each step passes
    0 for the other). The gradient's decay reads the parameter before it shrinks."""
    if l2_decay:
        grad = grad + l2_decay * param
    if decoupled_decay:
        param *= 1 - lr * decoupled_decay
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(v / (1 - beta2 ** step)) + eps
    param -= step_size * m / denom
    _write_bf16(param, param16)


# --- Weight averaging ------------------------------------------------------------------------------

def ema_update(average, param, decay):
    """average = decay * average + (1 - decay) * param, in place: one step of an exponential moving
    average of a parameter (fastnet.averaging). Computed as average += (1 - decay) * (param - average),
    whose one small product keeps the average exact where it already equals the parameter."""
    average += (1 - decay) * (param - average)
