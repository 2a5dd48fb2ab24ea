"""The multilayer perceptron: parameters, forward and backward passes, and their workspaces.

Layer i computes a_{i+1} = relu(a_i @ W_i + b_i), except the last, which leaves its output (the
logits) linear. Backpropagation walks the same layers in reverse:

    dlogits = (softmax(logits) - onehot(y)) / B       from the loss kernel
    g_{i+1} = d_{i+1} * (a_{i+1} > 0)                  the ReLU's mask (not after the last layer)
    dW_i = a_i.T @ g_{i+1},  db_i = column sums of g_{i+1}
    d_i  = g_{i+1} @ W_i.T                              not for the input layer

The arrays for one batch size (activations, their gradients, the parameter gradients) are allocated
once in a `Workspace` and reused by every step of that size.
"""

import numpy as np

from fastnet import backends

DTYPES = ("float32", "float64")
_MAX_WORKSPACES = 4  # a training batch, its last partial batch, an evaluation chunk, and one spare
_FORWARD_CHUNK = 1024


class Workspace:
    """Every array that one forward and backward pass of `batch_size` rows writes."""

    def __init__(self, sizes, params, batch_size, dtype):
        self.batch_size = batch_size
        # activations[0] is the input batch, activations[-1] the logits.
        self.activations = [np.zeros((batch_size, width), dtype) for width in sizes]
        # deltas[i] is dLoss/d activations[i], masked in place by the ReLU during backward; the
        # input's is never needed.
        self.deltas = [None] + [np.zeros((batch_size, width), dtype) for width in sizes[1:]]
        self.grads = [np.zeros_like(p) for p in params]
        self.labels = np.zeros(batch_size, np.int64)

    @property
    def inputs(self):
        return self.activations[0]

    @property
    def logits(self):
        return self.activations[-1]


class MLP:
    """A fully connected network with ReLU between layers.

    sizes: widths from input to output, e.g. [3072, 512, 512, 10].
    backend: a registered backend name (None: $FASTNET_BACKEND or "numpy").
    dtype: "float32" (training) or "float64" (gradient checks).
    seed: an int, or a np.random.Generator to draw the He initialisation from.
    """

    def __init__(self, sizes, backend="numpy", dtype="float32", seed=0):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least two positive widths, got {sizes}")
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        self.backend = backends.resolve(backend)
        self.kernels = backends.get(self.backend)
        rng = np.random.default_rng(seed)
        self.params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # Drawn in float64 and rounded, so float32 and float64 models of one seed start alike.
            weights = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            self.params += [weights.astype(self.dtype), np.zeros(fan_out, self.dtype)]
        self._workspaces = {}

    @property
    def num_layers(self):
        return len(self.sizes) - 1

    @property
    def weights(self):
        return self.params[0::2]

    @property
    def biases(self):
        return self.params[1::2]

    def workspace(self, batch_size):
        """The reusable arrays for batches of `batch_size` rows, allocated on first use."""
        workspace = self._workspaces.get(batch_size)
        if workspace is None:
            if len(self._workspaces) >= _MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
            workspace = Workspace(self.sizes, self.params, batch_size, self.dtype)
            self._workspaces[batch_size] = workspace
        return workspace

    # --- The passes, on a workspace whose inputs are filled in ------------------------------------

    def run_forward(self, ws):
        """Forward pass of ws.inputs; the logits land in ws.logits."""
        k = self.kernels
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            layer = k.dense_forward if i == self.num_layers - 1 else k.dense_relu_forward
            layer(ws.activations[i], W, b, ws.activations[i + 1])
        return ws.logits

    def run_backward(self, ws):
        """Loss of ws.logits against ws.labels, and every parameter's gradient into ws.grads.
        Returns the mean loss as a Python float."""
        k = self.kernels
        loss = k.softmax_cross_entropy(ws.logits, ws.labels, ws.deltas[-1])
        last = self.num_layers - 1
        for i in reversed(range(self.num_layers)):
            dx = ws.deltas[i] if i > 0 else None
            W, dW, db = self.weights[i], ws.grads[2 * i], ws.grads[2 * i + 1]
            if i == last:
                k.dense_backward(ws.deltas[i + 1], ws.activations[i], W, dW, db, dx)
            else:
                k.dense_relu_backward(ws.deltas[i + 1], ws.activations[i + 1], ws.activations[i], W, dW, db, dx)
        return loss

    # --- The public array API ----------------------------------------------------------------------

    def forward(self, x):
        """Logits (N, sizes[-1]) for inputs x (N, sizes[0]) already preprocessed."""
        x = self._as_inputs(x)
        logits = np.empty((len(x), self.sizes[-1]), self.dtype)
        for start in range(0, len(x), _FORWARD_CHUNK):
            chunk = x[start:start + _FORWARD_CHUNK]
            ws = self.workspace(len(chunk))
            ws.inputs[...] = chunk
            logits[start:start + len(chunk)] = self.run_forward(ws)
        return logits

    def predict(self, x):
        """The most likely class of each row of x."""
        return self.forward(x).argmax(axis=1)

    def loss_and_grads(self, x, y):
        """(mean softmax cross-entropy of the batch, gradients in the order of params).
        The gradients are new arrays, safe to keep."""
        x = self._as_inputs(x)
        y = np.asarray(y)
        if y.shape != (len(x),):
            raise ValueError(f"expected {len(x)} labels, got an array of shape {y.shape}")
        ws = self.workspace(len(x))
        ws.inputs[...] = x
        ws.labels[...] = y
        self.run_forward(ws)
        loss = self.run_backward(ws)
        return loss, [g.copy() for g in ws.grads]

    def _as_inputs(self, x):
        x = np.asarray(x)
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.sizes[0]:
            raise ValueError(f"the model takes {self.sizes[0]} inputs per row, got {x.shape[1]}")
        return x
