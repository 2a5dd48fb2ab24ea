"""One kernel call at a time, at the shapes of the R1 and R2 workloads, for each backend.

One class per kernel, so that a commit lacking one kernel skips only that kernel's benchmark. Every
array is allocated and filled in setup, which also calls the kernel once: a numba kernel compiles
(or loads from its disk cache) on that first call, so no compile time reaches a figure.
"""

import numpy as np

from . import (BACKENDS, LR, MOMENTUM, SIZES, WEIGHT_DECAY, Trainer, get_backend, get_kernel,
               pin_threads)


class _Kernel:
    params = [BACKENDS, list(SIZES)]
    param_names = ["backend", "size"]
    kernel_name = None

    def setup(self, backend, size):
        pin_threads()
        self.kernel = get_kernel(get_backend(backend), self.kernel_name)
        t = Trainer(backend, size)
        t.step()  # fills every activation, delta and gradient with a real step's values
        net, ws = t.net, t.net.workspace(t.batch_size)
        self.images, self.batch, self.shift, self.scale = t.images, t.batches[0], t.shift, t.scale
        self.x, self.W, self.b, self.h = ws.inputs, net.params[0], net.params[1], ws.activations[1]
        self.dh, self.dW, self.db = ws.deltas[1], ws.grads[0], ws.grads[1]
        self.logits, self.labels, self.dlogits = ws.logits, ws.labels, ws.deltas[-1]
        self.velocity = np.zeros_like(self.W)
        self.call()  # compile, or load from numba's cache, with exactly the timed arguments

    def time_kernel(self, backend, size):
        self.call()


class DenseForward(_Kernel):
    """First layer forward, bias and ReLU fused: h = relu(x @ W + b), x (B, 3072)."""
    kernel_name = "dense_relu_forward"

    def call(self):
        self.kernel(self.x, self.W, self.b, self.h)


class DenseBackward(_Kernel):
    """First layer backward: ReLU mask, dW = x.T @ dh and db; no input gradient (dx None)."""
    kernel_name = "dense_relu_backward"

    def call(self):
        self.kernel(self.dh, self.h, self.x, self.W, self.dW, self.db, None)


class SoftmaxCrossEntropy(_Kernel):
    """Mean loss of the logits (B, 10) and its gradient."""
    kernel_name = "softmax_cross_entropy"

    def call(self):
        self.kernel(self.logits, self.labels, self.dlogits)


class MomentumStep(_Kernel):
    """Heavy-ball momentum with weight decay on the first layer's weights (3072 x hidden)."""
    kernel_name = "momentum_step"

    def call(self):
        self.kernel(self.W, self.dW, self.velocity, LR, MOMENTUM, WEIGHT_DECAY)


class GatherNormalize(_Kernel):
    """Gather a minibatch of uint8 images by index and standardise it into float32."""
    kernel_name = "gather_normalize"

    def call(self):
        self.kernel(self.images, self.batch, self.shift, self.scale, self.x)
