"""The kernel calls of a training step that fastnet's kernel benchmarks time, one call at a time, at
the shapes of a workload of fastnet/workloads.py: one table (CALLS) for both suites that time them,
each with a job of its own (docs/testing.md):

- asv (benchmarks/bench_kernels.py) follows every call on each backend across commits;
- pytest-benchmark (tests/benchmarks/) times the numpy and numba backends' call side by side within
  one run, after checking it against the NumPy reference in float64.

Like fastnet/workloads.py, this file imports nothing from fastnet: asv loads it by path, so that a
commit from before it is timed on the same calls (a kernel that commit lacks is skipped there).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

IMAGES = 2048  # rows of the synthetic images a gather draws from: 6 MB of uint8
COMPONENTS = 256  # the row width of a `fastnet train --pca 256` run


def layer_shapes(sizes):
    """(fan_in, fan_out) of the layers of these widths that the calls run at, by the part each plays:
    "first", from the inputs (the widest products); "hidden", hidden to hidden, where there is one;
    "last", to the classes."""
    shapes = {"first": tuple(sizes[:2]), "last": tuple(sizes[-2:])}
    if len(sizes) > 3:
        shapes["hidden"] = tuple(sizes[1:3])
    return shapes


def inputs(sizes, batch, seed=0):
    """Float32 arrays (uint8 images) for every call at these layer widths and batch, from one seeded
    generator: per layer x, W, b, dout and a ReLU output; the images a batch is gathered from, its
    indices, labels and logits; a gradient and optimizer state of the first layer's weights."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    layers = {name: SimpleNamespace(
        fan_in=d, fan_out=h, x=normal(batch, d), W=normal(d, h, scale=np.sqrt(2 / d)), b=normal(h, scale=0.1),
        dout=normal(batch, h, scale=1 / batch), relu_out=np.maximum(normal(batch, h), 0))
        for name, (d, h) in layer_shapes(sizes).items()}
    # A network of one hidden layer (R2) has no hidden-to-hidden layer: the calls timed there run at
    # its first layer's shapes, so that every call has a figure for every workload.
    layers.setdefault("hidden", layers["first"])
    first = layer_shapes(sizes)["first"]
    return SimpleNamespace(
        batch=batch, layers=layers, images=rng.integers(0, 256, (IMAGES, sizes[0]), dtype=np.uint8),
        indices=rng.integers(0, IMAGES, batch), labels=rng.integers(0, sizes[-1], batch),
        shift=rng.uniform(100, 150, sizes[0]).astype(np.float32),
        scale=(1 / rng.uniform(50, 70, sizes[0])).astype(np.float32), logits=normal(batch, sizes[-1], scale=3.0),
        grad=normal(*first, scale=1e-2), velocity=normal(*first, scale=1e-2), m=normal(*first, scale=1e-2),
        v=np.square(normal(*first, scale=1e-2)), components=normal(IMAGES, COMPONENTS),
        flips=rng.integers(0, 2, batch).astype(np.uint8),
        signs=np.where(rng.random(COMPONENTS) < 0.5, -1, 1).astype(np.float32))


@dataclass(frozen=True)
class Call:
    kernel: str  # its name in every backend (fastnet.backends.KERNELS)
    layer: str  # the layer of inputs() it runs at
    arguments: object  # arguments(inputs, that layer) -> the call's arguments, with new outputs and state
    products: int = 0  # the matrix products of the layer's shape it computes (workloads.product_flops)
    moved: object = None  # moved(inputs, that layer) -> the bytes it reads and writes, where those bound it
    updates: bool = False  # it updates its state: repeated calls drift unless each has new arguments


def _dense_forward(w, L):
    return L.x, L.W, L.b, np.zeros((w.batch, L.fan_out), np.float32)


def _relu_backward(with_dx):
    def arguments(w, L):
        # dout is masked in place by the ReLU; masking again changes nothing, so repeated calls agree.
        dx = np.zeros_like(L.x) if with_dx else None
        return L.dout.copy(), L.relu_out, L.x, L.W, np.zeros_like(L.W), np.zeros_like(L.b), dx
    return arguments


OPTIMIZER_STEPS = {  # kind: (its state per parameter, in inputs(); its hyperparameters after the state)
    "sgd": ((), (0.05, 5e-3)),
    "momentum": (("velocity",), (0.05, 0.9, 5e-3)),
    "nesterov": (("velocity",), (0.05, 0.9, 5e-3)),
    "adam": (("m", "v"), (1e-3, 0.9, 0.999, 1e-8, 5e-3, 10)),
    "adamw": (("m", "v"), (1e-3, 0.9, 0.999, 1e-8, 5e-3, 10)),
}


def _optimizer_step(kind):
    state, hyperparameters = OPTIMIZER_STEPS[kind]

    def arguments(w, L):
        return L.W.copy(), w.grad, *[getattr(w, name).copy() for name in state], *hyperparameters

    # Each step reads the weights, their gradient and state, and writes the weights and state.
    return Call(f"{kind}_step", "first", arguments, moved=lambda w, L: L.W.nbytes * (3 + 2 * len(state)),
                updates=True)


CALLS = {
    "gather_normalize": Call("gather_normalize", "first",
                             lambda w, L: (w.images, w.indices, w.shift, w.scale, np.zeros_like(L.x)),
                             moved=lambda w, L: L.x.size * 5),  # a byte read and four written per element
    # The gather of `fastnet train --pca 256 --flip`: rows of components, about half of them flipped.
    "gather_flip_components": Call("gather_flip_components", "first", lambda w, L: (
        w.components, w.indices, w.flips, w.signs, np.zeros((w.batch, COMPONENTS), np.float32))),
    **{f"{kernel}[{layer}]": Call(kernel, layer, _dense_forward, products=1)
       for kernel in ("dense_relu_forward", "dense_forward") for layer in ("first", "last")},
    # The first layer needs no input gradient; a hidden one passes its gradient on.
    "dense_relu_backward[first]": Call("dense_relu_backward", "first", _relu_backward(False), products=1),
    "dense_relu_backward[hidden]": Call("dense_relu_backward", "hidden", _relu_backward(True), products=2),
    "dense_backward[last]": Call("dense_backward", "last", lambda w, L: (
        L.dout, L.x, L.W, np.zeros_like(L.W), np.zeros_like(L.b), np.zeros_like(L.x)), products=2),
    "softmax_cross_entropy": Call("softmax_cross_entropy", "last",
                                  lambda w, L: (w.logits, w.labels, np.zeros_like(w.logits))),
    "count_correct": Call("count_correct", "last", lambda w, L: (w.logits, w.labels)),
    **{f"{kind}_step": _optimizer_step(kind) for kind in OPTIMIZER_STEPS},
}


def call_arguments(name, w):
    """Call `name`'s arguments from inputs `w`, new outputs and state included."""
    call = CALLS[name]
    return call.arguments(w, w.layers[call.layer])
