"""One kernel call at a time, at the shapes of the R1 and R2 workloads, for each backend.

One class per kernel, so that a commit lacking one kernel skips only that kernel's benchmark. Every
array is allocated and filled in setup, which also calls the kernel once: a numba kernel compiles
(or loads from its disk cache) on that first call, so no compile time reaches a figure.
"""

import numpy as np

from . import BACKENDS, LR, MOMENTUM, WEIGHT_DECAY, WORKLOADS, Trainer, get_backend, get_kernel, pin_threads


class _Kernel:
    params = [BACKENDS, list(WORKLOADS)]
    param_names = ["backend", "size"]
    kernel_name = None

    def setup(self, backend, size):
        pin_threads(backend)
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


PRODUCTS = {  # name: (m, k, n, whether a is a transposed view, as x.T in a weight gradient)
    "128x3072@3072x512": (128, 3072, 512, False),
    "3072x128@128x512 (x.T @ dout)": (3072, 128, 512, True),
    "128x512@512x512": (128, 512, 512, False),
    "2048x2048@2048x2048": (2048, 2048, 2048, False),
}


class Product:
    """One float32 matrix product: NumPy's np.dot (BLAS's own threads) against the numba backend's
    GEMM driver (one tile per core, one-thread BLAS calls), at R1's shapes and at 2048^3, where the
    driver must not lose to BLAS."""

    params = [["blas", "driver"], list(PRODUCTS)]
    param_names = ["side", "shape"]

    def setup(self, side, shape):
        m, k, n, transposed = PRODUCTS[shape]
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((k, m) if transposed else (m, k), dtype=np.float32)
        if transposed:
            self.a = self.a.T
        self.b = rng.standard_normal((k, n), dtype=np.float32)
        self.out = np.empty((m, n), np.float32)
        if side == "driver":
            get_backend("numba")
            try:
                from fastnet.backends import numba_gemm
            except ImportError as exc:
                raise NotImplementedError("this commit has no GEMM driver") from exc
            pin_threads("numba")
            self.product = numba_gemm.matmul
        else:
            pin_threads("numpy")
            self.product = np.dot
        self.product(self.a, self.b, self.out)

    def time_product(self, side, shape):
        self.product(self.a, self.b, self.out)
