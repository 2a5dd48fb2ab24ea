"""One kernel call at a time, at the shapes of the R1 and R2 workloads, for each backend, across commits.

The calls are fastnet/kernel_calls.py's (loaded by path, as the workloads are), the same table the
pytest-benchmark suite in tests/benchmarks/ times numpy against numba with within one run. A commit
that lacks a call's kernel skips only that call's benchmark. Every array is allocated and filled in
setup, which also makes the call once: a numba kernel compiles (or loads from its disk cache) on that
first call, so no compile time reaches a figure.
"""

import numpy as np

from . import BACKENDS, WORKLOADS, get_backend, get_kernel, kernel_calls, pin_threads


class Kernel:
    """One call of kernel_calls.CALLS on a backend at a workload's shapes, e.g. `dense_relu_forward[first]`
    on R1: the first layer's forward, bias and ReLU fused, h = relu(x @ W + b) with x (128, 3072)."""

    params = [BACKENDS, list(WORKLOADS), list(kernel_calls.CALLS)]
    param_names = ["backend", "size", "call"]

    def setup(self, backend, size, call):
        pin_threads(backend)
        self.kernel = get_kernel(get_backend(backend), kernel_calls.CALLS[call].kernel)
        workload = WORKLOADS[size]
        self.arguments = kernel_calls.call_arguments(call, kernel_calls.inputs(workload.sizes, workload.batch_size))
        self.kernel(*self.arguments)  # compile, or load from numba's cache, with exactly the timed arguments

    def time_call(self, backend, size, call):
        self.kernel(*self.arguments)


def _products():
    """name: (m, k, n, whether a is a transposed view, as x.T in a weight gradient): R1's first-layer
    forward and weight gradient, its hidden layer's forward, and 2048^3."""
    batch, layers = WORKLOADS["R1"].batch_size, kernel_calls.layer_shapes(WORKLOADS["R1"].sizes)
    (inputs, width), (hidden, hidden_out) = layers["first"], layers["hidden"]
    return {f"{batch}x{inputs}@{inputs}x{width}": (batch, inputs, width, False),
            f"{inputs}x{batch}@{batch}x{width} (x.T @ dout)": (inputs, batch, width, True),
            f"{batch}x{hidden}@{hidden}x{hidden_out}": (batch, hidden, hidden_out, False),
            "2048x2048@2048x2048": (2048, 2048, 2048, False)}


PRODUCTS = _products()


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
