"""The multilayer perceptron: parameters, forward and backward passes, and their workspaces.

Each hidden layer computes, in this order,

    z = a_i @ W_i + b_i
    z = layernorm(z) * gain_i + bias_i       only with norm="layernorm"
    h = activation(z)                          relu, leaky_relu (slope 0.01), gelu (tanh form) or tanh
    a_{i+1} = dropout(h)                       only in training, with dropout > 0

and the last layer leaves its output (the logits) linear. Layer norm sits before the activation, so
the activation sees inputs of unit scale whatever the weights do. Backpropagation walks the same steps
in reverse; for the default network (ReLU, no norm, no dropout) it is

    dlogits = (softmax(logits) - onehot(y)) / B       from the loss kernel
    g_{i+1} = d_{i+1} * (a_{i+1} > 0)                  the ReLU's mask (not after the last layer)
    dW_i = a_i.T @ g_{i+1},  db_i = column sums of g_{i+1}
    d_i  = g_{i+1} @ W_i.T                              not for the input layer

Without norm, the bias and activation are fused into the GEMM's kernels (dense_<activation>_forward
and _backward). With norm, the layer is dense_forward, layernorm_forward and <activation>_forward.

The arrays for one batch size (activations, their gradients, the parameter gradients, and what
dropout and layer norm keep for backward) are allocated once in a `Workspace` and reused by every
step of that size.

Mixed precision (precision="bf16") changes only the GEMMs' operands, as the frameworks' autocast
does: every product reads bfloat16 copies of its inputs (the batch, the hidden activations, the
weights, the upstream gradients) and sums in float32 into float32 outputs. Everything else (the
master weights, the optimizer's state, the loss, layer norm, the activations and their derivatives)
stays float32. The copies are written where their float32 originals are: the input batch's by the
trainer's gather kernel (else by a round_to_bf16 pass), the activations' by the forward kernels,
the gradients' by the backward kernels' first pass, the weights' by the optimizer's update. Evaluation (`forward`, and
the trainer's per-epoch test accuracy) runs in float32 on the master weights, so the accuracy a run
reports is that of the model.npz it saves.
"""

import math
from itertools import pairwise

import numpy as np

from fastnet import activations, backends, settings
from fastnet.errors import SettingError
from fastnet.precision import PRECISIONS

DTYPES = ("float32", "float64")
ACTIVATIONS = tuple(activations.ACTIVATIONS)
NORMS = (None, "layernorm")
LAYERNORM_EPS = 1e-5
_MAX_WORKSPACES = 4  # a training batch, its last partial batch, an evaluation chunk, and one spare
_FORWARD_CHUNK = 1024


class Workspace:
    """Every array that one forward and backward pass of `batch_size` rows writes.

    Per hidden layer i (None where the network does not need it):
    pre[i]      the activation's input, kept for GELU's backward, and the dense output that layer
                norm normalises in place;
    xhat[i], inv_std[i]   layer norm's normalised input and 1/std per row;
    hidden[i]   the activation's output before dropout, in training; without dropout the activation
                writes straight into activations[i + 1];
    uniform[i]  the numbers in [0, 1) that decide which units dropout drops: the stream (draw_uniform)
                of one key that the step's generator draws per layer.

    With precision "bf16" (else None): activations16[i] the bfloat16 copy of activations[i] that
    layer i's products read (not of the logits), and deltas16[i] that of deltas[i].
    """

    def __init__(self, sizes, params, batch_size, dtype, activation="relu", norm=None, dropout=0.0,
                 precision="fp32"):
        self.batch_size = batch_size
        self.precision = precision
        # activations[0] is the input batch, activations[-1] the logits.
        self.activations = [np.zeros((batch_size, width), dtype) for width in sizes]
        # deltas[i] is dLoss/d activations[i], transformed in place on the way back through layer
        # i - 1 (dropout, activation, norm); the input's is never needed.
        self.deltas = [None] + [np.zeros((batch_size, width), dtype) for width in sizes[1:]]
        self.grads = [np.zeros_like(p) for p in params]
        self.labels = np.zeros(batch_size, np.int64)
        bf16 = precision == "bf16"
        self.activations16 = [np.zeros((batch_size, width), np.uint16) for width in sizes[:-1]] if bf16 else None
        self.deltas16 = [None] + [np.zeros((batch_size, width), np.uint16) for width in sizes[1:]] if bf16 else None

        hidden_widths = sizes[1:-1]

        def per_hidden_layer(needed, shape=lambda width: (batch_size, width)):
            return [np.zeros(shape(width), dtype) if needed else None for width in hidden_widths]

        self.pre = per_hidden_layer(activations.ACTIVATIONS[activation].reads_input or norm is not None)
        self.xhat = per_hidden_layer(norm is not None)
        self.inv_std = per_hidden_layer(norm is not None, shape=lambda width: (batch_size,))
        self.hidden = per_hidden_layer(dropout > 0)
        self.uniform = per_hidden_layer(dropout > 0)
        self.dropout_applied = False  # whether the last forward pass dropped units

    @property
    def inputs(self):
        return self.activations[0]

    @property
    def inputs16(self):
        """The bf16 copy of the inputs, for a gather kernel's out16 (None in fp32)."""
        return self.activations16[0] if self.activations16 is not None else None

    @property
    def logits(self):
        return self.activations[-1]


def check_settings(dtype="float32", activation="relu", dropout=0.0, norm=None, precision="fp32"):
    """The rules of an MLP's settings (SettingError when one is broken), for MLP itself and for
    TrainConfig.check, which applies them before a run reads its data. Returns the dtype."""
    try:
        name = str(np.dtype(dtype))
    except TypeError:
        name = str(dtype)
    settings.one_of("dtype", name, DTYPES)
    settings.one_of("activation", activation, ACTIVATIONS)
    settings.fraction("dropout", dropout, 0.1, what="is a rate in [0, 1)")
    settings.one_of("norm", norm, NORMS, advice="choose layernorm, or None for no normalisation")
    settings.one_of("precision", precision, PRECISIONS)
    if precision == "bf16" and name != "float32":
        raise SettingError("precision", f"{{setting}} bf16 keeps float32 master weights, so it needs dtype float32, "
                                        f"not {name}: use {{setting}} fp32 for {name}")
    return np.dtype(name)


class MLP:
    """A fully connected network.

    sizes: widths from input to output, e.g. [3072, 512, 512, 10].
    backend: a registered backend name (None: $FASTNET_BACKEND or "numpy").
    dtype: "float32" (training) or "float64" (gradient checks).
    seed: an int, or a np.random.Generator to draw the initial weights from.
    activation: "relu" (default), "leaky_relu" (slope 0.01), "gelu" (tanh approximation) or "tanh",
        after every hidden layer.
    dropout: the rate of inverted dropout after every hidden activation (0: none).
    norm: None, or "layernorm" on every hidden layer, between the dense layer and the activation.
    precision: "fp32", or "bf16" for mixed precision in training (float32 models only; see the module's
        docstring). weights16 holds the bfloat16 copy of each W; after writing params other than through
        an Optimizer given `param_copies`, call refresh_copies().

    Weights are drawn from a normal with std sqrt(2 / fan_in) (He), or sqrt(1 / fan_in) for tanh,
    which saturates; biases start at 0, layer-norm gains at 1. params lists each layer's W and b,
    followed for a hidden layer with norm by its gain and bias: [W1, b1, (g1, beta1,) W2, b2, ...].
    weights and biases are the dense layers' W and b only. All 1-D params are exempt from weight decay.

    Training mode: run_forward(ws, rng) with a np.random.Generator applies dropout: rng draws one
    64-bit key per hidden layer, in layer order, and the backend's draw_uniform turns each key into
    that layer's numbers (nothing is drawn when dropout is 0); run_forward(ws) without one is
    evaluation and deterministic. run_backward follows
    whichever the last run_forward did. forward, predict and loss_and_grads evaluate (no dropout)
    unless loss_and_grads is given an rng.

    spec() returns the keyword arguments above as a JSON-serialisable dict, so that
    MLP(net.sizes, **net.spec(), backend=..., dtype=...) builds the same architecture. An MLP pickles
    (its parameters, and its backend by name).
    """

    def __init__(self, sizes, backend="numpy", dtype="float32", seed=0, *, activation="relu", dropout=0.0,
                 norm=None, precision="fp32"):
        sizes = list(settings.widths("sizes", sizes, "[3072, 512, 10]", at_least=2))
        dtype = check_settings(dtype, activation, dropout, norm, precision)
        dropout = float(dropout)
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        self.precision = precision
        self.activation, self.dropout, self.norm = activation, dropout, norm
        self._activation = activations.ACTIVATIONS[activation]
        self.backend = backends.resolve(backend)
        self.kernels = backends.get(self.backend)
        rng = np.random.default_rng(seed)
        gain = 1.0 if activation == "tanh" else 2.0
        self.params = []
        self._weights, self._biases, self.norm_gains, self.norm_biases = [], [], [], []
        self._grad_positions = []  # per layer: where its W, b (and gain, bias) are in params
        for layer, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            # Drawn in float64 and rounded, so float32 and float64 models of one seed start alike.
            weights = rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in)
            arrays = [weights.astype(self.dtype), np.zeros(fan_out, self.dtype)]
            self._weights.append(arrays[0])
            self._biases.append(arrays[1])
            if norm is not None and layer < len(sizes) - 2:
                arrays += [np.ones(fan_out, self.dtype), np.zeros(fan_out, self.dtype)]
                self.norm_gains.append(arrays[2])
                self.norm_biases.append(arrays[3])
            self._grad_positions.append(list(range(len(self.params), len(self.params) + len(arrays))))
            self.params += arrays
        self.weights16 = [np.zeros(W.shape, np.uint16) for W in self._weights] if precision == "bf16" else None
        self.refresh_copies()
        self._workspaces = {}

    def __getstate__(self):
        """What a pickle keeps: the architecture, the backend's name and the parameters. The kernels
        (a module, which does not pickle) are found again by that name, and the workspaces and bf16
        copies are made again."""
        return {"sizes": self.sizes, "backend": self.backend, "dtype": self.dtype.name, "precision": self.precision,
                **self.spec(), "params": self.params}

    def __setstate__(self, state):
        state = dict(state)
        params = state.pop("params")
        self.__init__(state.pop("sizes"), **state)
        self.load_params(params)

    def load_params(self, params):
        """Set every parameter to the arrays `params` (of the same shapes, in self.params' order) and
        remake the bf16 copies from them."""
        for param, value in zip(self.params, params, strict=True):
            param[...] = value
        self.refresh_copies()

    @property
    def param_copies(self):
        """Per parameter, its bfloat16 copy (the weight matrices in bf16 precision) or None: what an
        Optimizer rewrites in its update pass."""
        copies = [None] * len(self.params)
        for layer, positions in enumerate(self._grad_positions):
            if self.weights16 is not None:
                copies[positions[0]] = self.weights16[layer]
        return copies

    def refresh_copies(self):
        """Round every weight matrix into its bfloat16 copy (nothing in fp32 precision)."""
        if self.weights16 is not None:
            for W, W16 in zip(self._weights, self.weights16, strict=True):
                self.kernels.round_to_bf16(W, W16)

    def spec(self):
        """The architecture beyond `sizes`, as keyword arguments of MLP (JSON-serialisable)."""
        return {"activation": self.activation, "dropout": self.dropout, "norm": self.norm}

    @property
    def num_layers(self):
        return len(self.sizes) - 1

    @property
    def weights(self):
        return list(self._weights)

    @property
    def biases(self):
        return list(self._biases)

    def workspace(self, batch_size, precision=None):
        """The reusable arrays for batches of `batch_size` rows, allocated on first use; passes on
        it compute in `precision` (None: the model's)."""
        precision = precision or self.precision
        workspace = self._workspaces.get((batch_size, precision))
        if workspace is None:
            if len(self._workspaces) >= _MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
            workspace = Workspace(self.sizes, self.params, batch_size, self.dtype, self.activation, self.norm,
                                  self.dropout, precision)
            self._workspaces[batch_size, precision] = workspace
        return workspace

    # --- The passes, on a workspace whose inputs are filled in ------------------------------------

    def run_forward(self, ws, rng=None, rounded_inputs=False):
        """Forward pass of ws.inputs; the logits land in ws.logits. With a np.random.Generator `rng`
        this is a training pass: dropout (if any) draws its masks from rng. rounded_inputs says that
        ws.inputs16 already holds the inputs in bf16 (the gather kernel wrote it): no pass to round them."""
        k, act = self.kernels, self._activation
        training = rng is not None and self.dropout > 0
        ws.dropout_applied = training
        bf16 = ws.precision == "bf16"
        if bf16 and not rounded_inputs:
            k.round_to_bf16(ws.inputs, ws.activations16[0])
        # What the products read: the float32 arrays, or their bf16 copies.
        inputs, weights = (ws.activations16, self.weights16) if bf16 else (ws.activations, self._weights)
        last = self.num_layers - 1
        for i in range(last):
            x, W, b = inputs[i], weights[i], self._biases[i]
            h = ws.hidden[i] if training else ws.activations[i + 1]
            # The bf16 copy of the layer's output comes from whichever kernel writes it last.
            out16 = ws.activations16[i + 1] if bf16 else None
            h16 = None if training else out16
            if self.norm is None:
                pre = (ws.pre[i],) if act.reads_input else ()
                getattr(k, act.dense_forward)(x, W, b, *act.scalars, *pre, h, h16)
            else:
                k.dense_forward(x, W, b, ws.pre[i])
                k.layernorm_forward(ws.pre[i], self.norm_gains[i], self.norm_biases[i], LAYERNORM_EPS,
                                    ws.xhat[i], ws.inv_std[i], ws.pre[i])
                getattr(k, act.forward)(ws.pre[i], *act.scalars, h, h16)
            if training:
                # One key per layer; a data-parallel rank's rows of its numbers start where its share does.
                key = rng.integers(0, 2**64, dtype=np.uint64)
                k.draw_uniform(key, getattr(rng, "first_row", 0), ws.uniform[i])
                k.dropout(h, ws.uniform[i], self.dropout, ws.activations[i + 1], out16)
        k.dense_forward(inputs[last], weights[last], self._biases[last], ws.activations[last + 1])
        return ws.logits

    def run_backward(self, ws, label_smoothing=0.0, layer_done=None):
        """Loss of ws.logits against ws.labels, and every parameter's gradient into ws.grads.
        label_smoothing in [0, 1) mixes that much of the uniform distribution into the targets.
        layer_done(net, ws, layer), when given, is called as soon as a layer's gradients are final,
        the last layer first: a data-parallel driver sends them while the layers below are computed.
        Returns the mean loss as a Python float."""
        k, act = self.kernels, self._activation
        if label_smoothing:
            loss = k.softmax_cross_entropy_smoothed(ws.logits, ws.labels, float(label_smoothing), ws.deltas[-1])
        else:
            loss = k.softmax_cross_entropy(ws.logits, ws.labels, ws.deltas[-1])
        last = self.num_layers - 1
        bf16 = ws.precision == "bf16"
        inputs, weights = (ws.activations16, self.weights16) if bf16 else (ws.activations, self._weights)
        for i in reversed(range(self.num_layers)):
            positions = self._grad_positions[i]
            x, W, dW, db = inputs[i], weights[i], ws.grads[positions[0]], ws.grads[positions[1]]
            delta, dx = ws.deltas[i + 1], ws.deltas[i] if i > 0 else None
            delta16 = ws.deltas16[i + 1] if bf16 else None
            if i == last:
                k.dense_backward(delta, x, W, dW, db, dx, delta16)
            else:
                if ws.dropout_applied:
                    k.dropout(delta, ws.uniform[i], self.dropout, delta)
                # The activation's backward reads its input (GELU) or its output (the others), which
                # is where dropout (if any) was applied to make the layer's output.
                saved = ws.pre[i] if act.reads_input else ws.hidden[i] if ws.dropout_applied else ws.activations[i + 1]
                if self.norm is None:
                    getattr(k, act.dense_backward)(delta, saved, x, W, *act.scalars, dW, db, dx, delta16)
                else:
                    getattr(k, act.backward)(delta, saved, *act.scalars, delta)
                    dgain, dbias = ws.grads[positions[2]], ws.grads[positions[3]]
                    k.layernorm_backward(delta, ws.xhat[i], ws.inv_std[i], self.norm_gains[i], dgain, dbias, delta)
                    k.dense_backward(delta, x, W, dW, db, dx, delta16)
            if layer_done is not None:
                layer_done(self, ws, i)
        return loss

    def layer_grads(self, ws, layer):
        """The arrays of ws.grads that hold `layer`'s gradients: its W and b (and gain and bias)."""
        return [ws.grads[position] for position in self._grad_positions[layer]]

    def clip_grad_norm(self, grads, max_norm):
        """Scale `grads` (e.g. ws.grads) in place so that their global L2 norm is at most max_norm, as
        torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping. Call it between
        run_backward and the optimizer's step. Costs one read of every gradient (sum_of_squares),
        and one in-place multiply of each only when the norm is over the limit."""
        norm = math.sqrt(sum(self.kernels.sum_of_squares(g) for g in grads))
        if norm > max_norm:
            factor = float(max_norm) / (norm + 1e-6)
            for g in grads:
                g *= factor
        return norm

    def with_input_projection(self, projection, into=None):
        """The network that computes on raw inputs x what this one computes on x @ projection: the same
        layers, with projection @ W1 as the first weight matrix. A network trained on projected inputs
        (fastnet train --pca) is saved and used in this form, so it classifies raw images like any
        other. Written into `into`, a network of that shape, when given; else into a new one."""
        if into is None:
            into = MLP([projection.shape[0], *self.sizes[1:]], backend=self.backend, dtype=self.dtype,
                       precision=self.precision, **self.spec())
        for target, source in zip(into.params[1:], self.params[1:], strict=True):
            target[...] = source
        # In float64 and rounded once, so the folded weights are as exact as float32 can hold them.
        into.params[0][...] = np.dot(projection.astype(np.float64), self.params[0].astype(np.float64))
        into.refresh_copies()
        return into

    # --- The public array API ----------------------------------------------------------------------

    def forward(self, x):
        """Logits (N, sizes[-1]) for inputs x (N, sizes[0]) already preprocessed; no dropout, and in
        float32 whatever the training precision."""
        x = self._as_inputs(x)
        logits = np.empty((len(x), self.sizes[-1]), self.dtype)
        for start in range(0, len(x), _FORWARD_CHUNK):
            chunk = x[start:start + _FORWARD_CHUNK]
            ws = self.workspace(len(chunk), "fp32")
            ws.inputs[...] = chunk
            logits[start:start + len(chunk)] = self.run_forward(ws)
        return logits

    def predict(self, x):
        """The most likely class of each row of x."""
        return self.forward(x).argmax(axis=1)

    def loss_and_grads(self, x, y, rng=None, label_smoothing=0.0):
        """(mean softmax cross-entropy of the batch, gradients in the order of params), in the model's
        precision. Deterministic, without dropout, unless `rng` is given (see run_forward);
        label_smoothing as in run_backward. The gradients are new arrays, safe to keep."""
        x = self._as_inputs(x)
        y = np.asarray(y)
        if y.shape != (len(x),):
            raise ValueError(f"expected {len(x)} labels, got an array of shape {y.shape}")
        settings.fraction("label_smoothing", label_smoothing, 0.1)
        ws = self.workspace(len(x))
        ws.inputs[...] = x
        ws.labels[...] = y
        self.run_forward(ws, rng)
        loss = self.run_backward(ws, label_smoothing)
        return loss, [g.copy() for g in ws.grads]

    def _as_inputs(self, x):
        x = np.asarray(x)
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.sizes[0]:
            raise ValueError(f"the model takes {self.sizes[0]} inputs per row, got {x.shape[1]}")
        return x
