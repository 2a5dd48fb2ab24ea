"""Shared set-up for fastnet's asv suite (see README.md in this folder).

asv imports this package at discovery, on whatever commit it is benchmarking, so nothing here may
import fastnet at module level: every fastnet name is looked up inside a benchmark's `setup`, and
anything a commit lacks (the numba backend, a kernel, an API) becomes `NotImplementedError`, which
asv reports as a skipped benchmark instead of a broken suite.
"""

import importlib.util
import os
import pathlib
import sys

import numpy as np


def _of_this_suite(name):
    """fastnet/<name>.py of the source tree this suite is in, loaded by path under a name of its own:
    the workloads and the kernel calls are part of what is measured, so they stay the same at every
    commit, including the commits that came before those files."""
    module_name = f"fastnet_asv_{name}"
    if module_name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent.parent / "fastnet" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before it runs: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[module_name]


workloads = _of_this_suite("workloads")
kernel_calls = _of_this_suite("kernel_calls")
BACKENDS = ["numpy", "numba"]
WORKLOADS = workloads.WORKLOADS  # R1 and R2, docs/speed.md's
DTYPE = workloads.DTYPE
MOMENTUM = workloads.MOMENTUM
NUM_IMAGES = 2048  # synthetic training images built in setup: 6 MB of uint8, no dataset needed
LR = 1e-3          # small enough that thousands of timed steps on random labels never diverge
WEIGHT_DECAY = 5e-3  # the default recipe's, applied to weight matrices only

# Cores for every benchmark. asv.conf.json sets OPENBLAS_NUM_THREADS and NUMBA_NUM_THREADS to the same
# value for the benchmark processes; pin_threads() applies it as `fastnet --threads` does: numpy's BLAS
# threads, or the numba backend's tile threads with its BLAS held to one (backends.use_threads).
BLAS_THREADS = int(os.environ.get("OPENBLAS_NUM_THREADS", "2"))


def pin_threads(backend="numpy"):
    """Run `backend` on BLAS_THREADS cores for the rest of the process. At commits before
    backends.use_threads, every loaded BLAS library is limited to BLAS_THREADS instead."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (load scipy's OpenBLAS too, so the limit reaches it)
    except ImportError:  # commits before the numba backend did not depend on scipy
        pass
    try:
        from fastnet import backends
        use_threads = backends.use_threads
    except (ImportError, AttributeError):
        use_threads = None
    if use_threads is not None:
        try:
            context = use_threads(backend, BLAS_THREADS)
        except Exception as exc:  # an unavailable backend: its benchmark is skipped
            raise NotImplementedError(f"backend {backend!r}: {exc}") from exc
        context.__enter__()  # kept for the rest of the process, as the limit below is
        return context
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=BLAS_THREADS, user_api="blas")


def synthetic_data(num_images, input_size=3072, num_classes=10, seed=0):
    """Random uint8 images (num_images, input_size) and int64 labels, plus a float32 shift and scale
    like the trainer's per-channel standardisation."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, input_size), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_images).astype(np.int64)
    shift = np.full(input_size, 0.47 * 255, DTYPE)
    scale = np.full(input_size, 1.0 / (0.25 * 255), DTYPE)
    return images, labels, shift, scale


def get_backend(name):
    """fastnet's backend `name`, or NotImplementedError (asv: skipped) when this commit lacks it."""
    try:
        from fastnet import backends
        return backends.get(name)
    except Exception as exc:  # ImportError, FastnetError (unknown or unavailable backend), KeyError ...
        raise NotImplementedError(f"backend {name!r} is not available at this commit: {exc}") from exc


def get_kernel(backend, name):
    kernel = getattr(backend, name, None)
    if not callable(kernel):
        raise NotImplementedError(f"kernel {name!r} does not exist at this commit")
    return kernel


def require(module_names, *attributes):
    """Import fastnet.<module_name> and return the attributes, or raise NotImplementedError.
    module_names: a name, or a tuple of the names that have held the attributes, newest first (asv
    runs these benchmarks on past commits too: train_epoch was in fastnet.train before fastnet.step)."""
    import importlib
    names = (module_names,) if isinstance(module_names, str) else module_names
    errors = []
    for name in names:
        try:
            module = importlib.import_module(f"fastnet.{name}")
            return [getattr(module, attribute) for attribute in attributes]
        except (ImportError, AttributeError) as exc:
            errors.append(f"fastnet.{name}: {exc}")
    raise NotImplementedError(f"no module has {attributes} at this commit: {'; '.join(errors)}")


def require_bf16(backend):
    """Raise NotImplementedError (asv: skipped) where bf16 cannot be measured: before the commit that
    added it, or on a CPU without AMX-BF16 or AVX512-BF16, where fastnet refuses it."""
    check, = require("precision", "check")
    try:
        check("bf16", backend)
    except Exception as exc:  # FastnetError: what fastnet train would print
        raise NotImplementedError(f"no bf16 here: {exc}") from exc


class Trainer:
    """A model, its optimizer and synthetic data for one workload, trained a step at a time."""

    def __init__(self, backend, size, num_images=NUM_IMAGES, precision="fp32"):
        get_backend(backend)
        MLP, = require("model", "MLP")
        Optimizer, Schedule = require("optim", "Optimizer", "Schedule")
        self.train_epoch, = require(("step", "train"), "train_epoch")
        self.schedule = Schedule("constant", LR, 1)
        mixed = {}
        if precision != "fp32":
            require_bf16(backend)
            mixed = {"precision": precision}
        self.sizes, self.batch_size = list(WORKLOADS[size].sizes), WORKLOADS[size].batch_size
        self.images, self.labels, self.shift, self.scale = synthetic_data(num_images, self.sizes[0],
                                                                          self.sizes[-1])
        self.net = MLP(self.sizes, backend=backend, dtype=DTYPE, seed=0, **mixed)
        copies = {"copies": self.net.param_copies} if mixed else {}
        self.optimizer = Optimizer(self.net.params, "momentum", momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY, backend=backend, **copies)
        self.kernels = self.net.kernels
        rng = np.random.default_rng(1)
        order = rng.permutation(num_images)
        usable = num_images - num_images % self.batch_size
        self.batches = [order[start:start + self.batch_size] for start in range(0, usable, self.batch_size)]
        self.next_batch = 0

    def step(self):
        """One training step on the next minibatch, through fastnet.step.train_epoch, the loop that
        `fastnet train` runs (its signature has not changed since the first commit). Returns the loss."""
        batch = self.batches[self.next_batch]
        self.next_batch = (self.next_batch + 1) % len(self.batches)
        loss_sum = self.train_epoch(self.net, self.optimizer, self.schedule, self.images, self.labels, self.shift,
                                    self.scale, batch, self.batch_size, 1, 0)[0]
        return loss_sum / len(batch)

    def order(self, steps, seed=2):
        """Indices for `steps` full minibatches: permutations of the images, concatenated."""
        rng = np.random.default_rng(seed)
        needed = steps * self.batch_size
        reps = -(-needed // len(self.images))
        return np.concatenate([rng.permutation(len(self.images)) for _ in range(reps)])[:needed]
