"""A training step allocates nothing once it has run: no NumPy buffer (tracemalloc), no array of
Numba's runtime, and every buffer of the network and the optimizer stays where it was. The step
measured is the trainer's own, fastnet.step.training_step, in float32 and bf16, with and without
augmentation, dropout, layer norm, label smoothing and clipping, and with a weight average (--ema)."""

import tracemalloc

import numpy as np
import pytest

from fastnet.averaging import WeightAverage
from fastnet.data import Augmentation, ComponentFlip, ProjectedAugmentation
from fastnet.model import MLP
from fastnet.optim import Optimizer
from fastnet.step import StepOptions, training_step
from helpers import OTHER_BACKENDS, unavailable

# One input buffer is ALLOCATION_BATCH x 512 float32 = 128 KB; a step that allocated any buffer of the
# model would go far past the threshold, while Python's own small objects (floats, views, the
# arguments of calls) stay well below it.
ALLOCATION_SIZES = [512, 256, 64, 10]
ALLOCATION_BATCH = 64
ALLOCATION_THRESHOLD = 16 * 1024
ALLOCATION_IMAGE = (16, 16, 2)  # ALLOCATION_SIZES[0] inputs
PROJECTED_IMAGE = (32, 16, 2)  # pixels that a projection takes to ALLOCATION_SIZES[0] inputs
REGULARISED = dict(activation="gelu", dropout=0.2, norm="layernorm")
VARIANTS = ["default", "regularised", "components", "projected", "bf16", "regularised bf16", "averaged"]


def allocation_setup(backend, variant="default"):
    """A network, its optimizer and 20 training steps of one of six kinds: "default", "regularised"
    (pixel augmentation, dropout, layer norm, label smoothing, clipping), "components" (images
    stored as principal components and flipped by sign, as fastnet train --pca K --flip trains),
    "projected" (pixel augmentation, then a projection, as --pca K --translate N trains), and
    "bf16" and "regularised bf16", the first two in mixed precision, and "averaged" (a weight average,
    fastnet train --ema). Returns the network, its optimizer, the steps and their StepOptions."""
    rng = np.random.default_rng(0)
    spec = REGULARISED if variant in ("regularised", "regularised bf16") else {}
    precision = "bf16" if variant.endswith("bf16") else "fp32"
    net = MLP(ALLOCATION_SIZES, backend=backend, seed=rng, precision=precision, **spec)
    optimizer = Optimizer(net.params, "momentum", weight_decay=1e-3, backend=backend, copies=net.param_copies)
    images = rng.integers(0, 256, (8 * ALLOCATION_BATCH, ALLOCATION_SIZES[0]), dtype=np.uint8)
    labels = rng.integers(0, ALLOCATION_SIZES[-1], len(images))
    shift = np.full(ALLOCATION_SIZES[0], 120, np.float32)
    scale = np.full(ALLOCATION_SIZES[0], 1 / 64, np.float32)
    order = rng.permutation(len(images))
    batches = [order[i:i + ALLOCATION_BATCH] for i in range(0, len(order), ALLOCATION_BATCH)]
    augmentation = Augmentation(ALLOCATION_IMAGE, flip=True, translate=2, cutout=4)
    if variant == "components":
        images = rng.standard_normal(images.shape).astype(np.float32)
        shift, scale = np.zeros_like(shift), np.ones_like(scale)
        signs = np.where(rng.random(ALLOCATION_SIZES[0]) < 0.5, -1, 1).astype(np.float32)
        augmentation = ComponentFlip(signs)
    elif variant == "projected":  # the network's inputs are the projection of the augmented pixels
        pixels = int(np.prod(PROJECTED_IMAGE))
        images = rng.integers(0, 256, (len(images), pixels), dtype=np.uint8)
        shift, scale = np.full(pixels, 120, np.float32), np.full(pixels, 1 / 64, np.float32)
        projection = (rng.standard_normal((pixels, ALLOCATION_SIZES[0])) / np.sqrt(pixels)).astype(np.float32)
        augmentation = ProjectedAugmentation(Augmentation(PROJECTED_IMAGE, flip=True, translate=2, cutout=4),
                                             projection)
    options = StepOptions(rng)  # fastnet train hands its generator to every step, with or without draws
    if variant not in ("default", "bf16", "averaged"):
        options = StepOptions(rng, augmentation, label_smoothing=0.1, clip=1.0)
    if variant == "averaged":
        options.average = WeightAverage(net, 0.99)
    step = [lambda b=b: training_step(net, optimizer, images, labels, shift, scale, b, 0.01, options) for b in batches]
    for s in step[:3]:  # warm-up: compiles, and allocates the workspace
        s()
    return net, optimizer, [step[i % len(step)] for i in range(20)], options


def peak_allocation(steps):
    """The peak of memory traced by tracemalloc (which sees NumPy's buffers) over running `steps`."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for s in steps:
            s()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def buffers(net, optimizer, options):
    ws = net.workspace(ALLOCATION_BATCH)
    arrays = [*net.params, *ws.activations, *ws.deltas[1:], *ws.grads, ws.labels]
    if options.average is not None:
        arrays += options.average.model.params
    arrays += [a for group in (ws.pre, ws.xhat, ws.inv_std, ws.hidden, ws.uniform) for a in group if a is not None]
    if net.precision == "bf16":
        arrays += [*ws.activations16, *ws.deltas16[1:], *net.weights16]
    return arrays + [a for group in optimizer.state.values() for a in group]


def test_the_allocation_probe_sees_numpys_temporaries():
    """The NumPy backend gathers the batch with fancy indexing, a temporary copy: the probe below
    must see it, or it could not see a backend allocating either."""
    net, optimizer, steps, _ = allocation_setup("numpy")
    assert peak_allocation(steps) > ALLOCATION_THRESHOLD


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_allocates_nothing_after_warm_up(other, variant):
    net, optimizer, steps, options = allocation_setup(other, variant)
    before = [(a, a.ctypes.data) for a in buffers(net, optimizer, options)]
    peak = peak_allocation(steps)
    assert peak < ALLOCATION_THRESHOLD, f"{other}: 20 training steps allocated up to {peak} bytes"
    # The same arrays, at the same addresses: nothing was replaced or reallocated.
    after = buffers(net, optimizer, options)
    assert len(after) == len(before)
    for (array, address), now in zip(before, after, strict=True):
        assert now is array and now.ctypes.data == address
    assert len(net._workspaces) == 1


class NrtAllocationRecorder:
    """Wraps a Numba backend and records, per kernel, the allocations of Numba's runtime (NRT) that a
    call makes beyond those of passing its arguments in. tracemalloc does not see NRT allocations.

    Numba allocates a small header (a MemInfo) for every array argument it receives and frees it on
    return, so `per_array` (measured, see nrt_allocations_per_array_argument) is subtracted.
    """

    def __init__(self, backend, rtsys, per_array):
        self.backend, self.rtsys, self.per_array = backend, rtsys, per_array
        self.extra = {}    # kernel -> NRT allocations beyond the arguments' headers
        self.leaked = {}   # kernel -> NRT allocations not freed on return
        self.calls = 0

    def __getattr__(self, name):
        kernel = getattr(self.backend, name)

        def recorded(*args):
            arrays = sum(isinstance(a, np.ndarray) for a in args)
            before = self.rtsys.get_allocation_stats()
            result = kernel(*args)
            after = self.rtsys.get_allocation_stats()
            allocs, frees = after.alloc - before.alloc, after.free - before.free
            self.calls += 1
            self.extra[name] = self.extra.get(name, 0) + allocs - self.per_array * arrays
            self.leaked[name] = self.leaked.get(name, 0) + allocs - frees
            return result

        return recorded


def nrt_allocations_per_array_argument(rtsys):
    from numba import njit

    @njit
    def takes_three_arrays(a, b, c):
        return None

    arrays = np.zeros(3), np.zeros((2, 2), np.float32), np.zeros(4, np.int64)
    takes_three_arrays(*arrays)  # compile
    before = rtsys.get_allocation_stats().alloc
    takes_three_arrays(*arrays)
    allocs = rtsys.get_allocation_stats().alloc - before
    assert allocs % 3 == 0, allocs
    return allocs // 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_numba_kernels_allocate_no_arrays_in_a_training_step(variant):
    if "numba" not in OTHER_BACKENDS:
        unavailable("the numba backend is not available: pip install numba")
    from numba.core.runtime import _nrt_python, rtsys

    was_enabled = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        net, optimizer, steps, _ = allocation_setup("numba", variant)
        recorder = NrtAllocationRecorder(net.kernels, rtsys, nrt_allocations_per_array_argument(rtsys))
        net.kernels = optimizer.kernels = recorder  # what MLP and Optimizer call their kernels through
        for s in steps:
            s()
    finally:
        if not was_enabled:
            _nrt_python.memsys_disable_stats()
    used = {"default": {"dense_relu_backward", "momentum_step"},
            "bf16": {"gather_normalize", "dense_relu_forward", "dense_relu_backward", "momentum_step"},
            "regularised bf16": {"augment_gather_normalize", "layernorm_forward", "gelu_forward", "draw_uniform",
                                 "dropout", "dense_backward", "momentum_step"},
            "regularised": {"augment_gather_normalize", "layernorm_forward", "layernorm_backward", "gelu_forward",
                            "gelu_backward", "draw_uniform", "dropout", "softmax_cross_entropy_smoothed",
                            "sum_of_squares", "momentum_step"},
            "components": {"gather_flip_components", "dense_relu_backward", "momentum_step"},
            "projected": {"augment_gather_normalize", "dense_forward", "dense_relu_backward", "momentum_step"},
            "averaged": {"dense_relu_backward", "momentum_step", "ema_update"}}[variant]
    assert recorder.calls >= 20 * 12 and set(recorder.extra) >= used
    # The trainer's gather writes the batch's bf16 copy, so no pass rounds it again.
    assert "round_to_bf16" not in recorder.extra
    assert {k: n for k, n in recorder.extra.items() if n} == {}, "kernels allocated arrays (count over 20 steps)"
    assert {k: n for k, n in recorder.leaked.items() if n} == {}, "kernels leaked NRT memory"
