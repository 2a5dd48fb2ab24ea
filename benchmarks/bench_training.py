"""Whole training steps, an epoch slice, throughput, peak memory, JIT start-up and thread settings.

Data is synthetic (random uint8 images from np.random.default_rng(0)), built in setup; the model,
optimizer (momentum 0.9, weight decay 5e-3 on weights) and step are fastnet's own API, used as
fastnet.step.train_epoch uses it. Numba kernels are compiled in setup, by running real steps.
"""

import os
import shutil
import time

import numpy as np

from . import BACKENDS, BLAS_THREADS, LR, MOMENTUM, WEIGHT_DECAY, WORKLOADS, Trainer, get_backend, pin_threads, require

EPOCH_SLICE_STEPS = 50


class TrainingStep:
    params = [BACKENDS, list(WORKLOADS)]
    param_names = ["backend", "size"]

    def setup(self, backend, size):
        pin_threads(backend)
        self.trainer = Trainer(backend, size)
        train_epoch, = require(("step", "train"), "train_epoch")
        Schedule, = require("optim", "Schedule")
        self.train_epoch = train_epoch
        self.schedule = Schedule("constant", LR, EPOCH_SLICE_STEPS)
        self.order = self.trainer.order(EPOCH_SLICE_STEPS)
        for _ in range(2):  # compile, or load from numba's cache, and touch every workspace page
            self.trainer.step()

    def time_training_step(self, backend, size):
        """Gather + normalise, forward, loss, backward and momentum update of one minibatch."""
        self.trainer.step()

    def time_epoch_slice(self, backend, size):
        """50 steps through fastnet.step.train_epoch itself (its loop, schedule and checks included)."""
        t = self.trainer
        self.train_epoch(t.net, t.optimizer, self.schedule, t.images, t.labels, t.shift, t.scale,
                         self.order, t.batch_size, 1, 0)


class Throughput:
    """R1 training throughput, as docs/speed.md describes it, in float32 and in bf16 mixed
    precision (measured only on CPUs with AMX-BF16 or AVX512-BF16)."""

    params = [BACKENDS, ["fp32", "bf16"]]
    param_names = ["backend", "precision"]
    blocks, steps_per_block = 5, 20

    def setup(self, backend, precision):
        pin_threads(backend)
        self.trainer = Trainer(backend, "R1", precision=precision)
        for _ in range(3):
            self.trainer.step()

    def _median_step_seconds(self):
        seconds = []
        for _ in range(self.blocks):
            started = time.perf_counter()
            for _ in range(self.steps_per_block):
                self.trainer.step()
            seconds.append((time.perf_counter() - started) / self.steps_per_block)
        return float(np.median(seconds))

    def track_samples_per_second(self, backend, precision):
        return self.trainer.batch_size / self._median_step_seconds()
    track_samples_per_second.unit = "samples/s"

    def track_gflops(self, backend, precision):
        """Useful GFLOP/s: fastnet/workloads.py's flops_per_sample, per sample."""
        flops = WORKLOADS["R1"].flops_per_sample * self.trainer.batch_size
        return flops / self._median_step_seconds() / 1e9
    track_gflops.unit = "GFLOP/s"


class DataParallel:
    """R1 throughput data-parallel: `mpirun -n 2` ranks of one thread each (fastnet train --distributed),
    timed by fastnet bench's own worker; beside Throughput's one process on every core."""

    params = [BACKENDS]
    param_names = ["backend"]
    ranks, steps = 2, 100
    timeout = 300

    def setup(self, backend):
        if shutil.which("mpirun") is None:
            raise NotImplementedError("no mpirun on this machine: apt-get install openmpi-bin")
        self.side, self.measure = require("bench", "data_parallel_side", "measure_in_own_process")

    def track_samples_per_second(self, backend):
        workload = WORKLOADS["R1"]
        timing = self.measure(self.side(backend, self.ranks, self.ranks), list(workload.sizes), workload.batch_size,
                              self.steps)
        return workload.batch_size * self.steps / timing["seconds"]
    track_samples_per_second.unit = "samples/s"


class EpochMemory:
    """Peak resident memory of a process that trains one epoch of 10,000 synthetic images.

    asv's peakmem is the process's maximum RSS, so it includes the interpreter, numpy, the data
    (30 MB of uint8), the model, its workspace and, for numba, loading the compiled kernels."""

    params = [BACKENDS, list(WORKLOADS)]
    param_names = ["backend", "size"]
    num_images = 10_000

    def setup(self, backend, size):
        pin_threads(backend)
        self.trainer = Trainer(backend, size, num_images=self.num_images)
        train_epoch, = require(("step", "train"), "train_epoch")
        Schedule, = require("optim", "Schedule")
        self.train_epoch = train_epoch
        steps = self.num_images // self.trainer.batch_size
        self.schedule = Schedule("constant", LR, steps)
        self.order = self.trainer.order(steps)

    def peakmem_epoch(self, backend, size):
        t = self.trainer
        self.train_epoch(t.net, t.optimizer, self.schedule, t.images, t.labels, t.shift, t.scale,
                         self.order, t.batch_size, 1, 0)


class FullDatasetMemory:
    """Peak resident memory of what `fastnet train` does for R1 on a CIFAR-10-sized data set: load
    50,000 + 10,000 images from python batches, compute the channel statistics, train 100 steps and
    evaluate. Issue 7's bound is 0.6 GB for the whole process, on either backend; holding the
    training set as float32 alone would take 614 MB."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 600
    images_per_batch, steps = 10_000, 100

    def setup_cache(self):
        """A folder of random CIFAR-10-shaped python batches (184 MB), in asv's working folder."""
        import pickle
        folder = os.path.abspath("cifar-sized/cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (self.images_per_batch, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, self.images_per_batch).tolist()}
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(batch, f, protocol=2)
        return folder

    def setup(self, folder, backend):
        pin_threads(backend)
        get_backend(backend)

    def peakmem_load_train_evaluate(self, folder, backend):
        load_dataset, channel_stats = require("data", "load_dataset", "channel_stats")
        train_epoch, = require(("step", "train"), "train_epoch")
        normalizer, evaluate = require(("evaluation", "train"), "normalizer", "evaluate")
        MLP, = require("model", "MLP")
        Optimizer, Schedule = require("optim", "Optimizer", "Schedule")
        dataset = load_dataset(folder)
        mean, std = channel_stats(dataset.train_images)
        shift, scale = normalizer(mean, std, dataset.input_size, dataset.train_images.dtype, "float32")
        sizes, batch = list(WORKLOADS["R1"].sizes), WORKLOADS["R1"].batch_size
        net = MLP(sizes, backend=backend)
        optimizer = Optimizer(net.params, "nesterov", momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend)
        order = np.random.default_rng(0).permutation(len(dataset.train_labels))[:self.steps * batch]
        train_epoch(net, optimizer, Schedule("constant", LR, self.steps), dataset.train_images.reshape(-1, 3072),
                    dataset.train_labels, shift, scale, order, batch, 1, 0)
        evaluate(net, dataset.test_images, dataset.test_labels, shift, scale)


# --- Numba start-up: import, compile or load from cache, in a fresh interpreter -------------------

# Runs in the timed child before anything is imported: a private, empty numba cache.
_FRESH_CACHE = """
import atexit, os, shutil, tempfile
cache = tempfile.mkdtemp(prefix="fastnet-asv-numba-")
atexit.register(shutil.rmtree, cache, True)
os.environ["NUMBA_CACHE_DIR"] = cache
"""

# Compiles every kernel of a training step into $NUMBA_CACHE_DIR, in another process. (timeit
# indents the setup code, string literals included: hence the dedent.)
_POPULATE = _FRESH_CACHE + """
import subprocess, sys, textwrap
subprocess.run([sys.executable, "-c", textwrap.dedent('''{warm}''')], check=True)
"""

# What is timed: load the numba backend and warm up as `fastnet train` does before its first epoch.
_WARM_UP = """
import numpy as np
from fastnet.model import MLP
from fastnet.optim import Optimizer
try:
    from fastnet.step import warm_up
except ImportError:  # a commit from before fastnet.step
    from fastnet.train import warm_up
net = MLP([3072, 512, 512, 10], backend="numba", dtype="float32")
warm_up(net, Optimizer(net.params, "momentum", backend="numba"), np.uint8)
"""


class NumbaStartup:
    """Seconds from `import fastnet` having run to every kernel of a training step being ready.

    Each sample is a fresh interpreter (asv timeraw). The setup part of the snippet runs in that
    interpreter too but is not timed: cold gives it an empty NUMBA_CACHE_DIR, warm an
    NUMBA_CACHE_DIR that another process filled first, so warm is loading from the disk cache."""

    repeat = 3
    number = 1
    timeout = 240

    def setup(self):
        get_backend("numba")
        require(("step", "train"), "warm_up")

    def timeraw_jit_cold(self):
        return _WARM_UP, _FRESH_CACHE + "import fastnet\n"

    def timeraw_jit_warm(self):
        return _WARM_UP, _POPULATE.format(warm=_WARM_UP) + "import fastnet\n"


# --- What the figures were measured with ----------------------------------------------------------

def _blas_threads():
    """{label: threads} of the BLAS libraries loaded after numpy and scipy (numba's np.dot goes
    through scipy's); a label names the library, version, OpenBLAS kernel type and folder, e.g.
    'openblas 0.3.30 Haswell (scipy.libs)'."""
    import os
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture')} "
            f"({os.path.basename(os.path.dirname(lib.get('filepath', '')))})": lib["num_threads"]
            for lib in threadpool_info() if lib.get("user_api") == "blas"}


class Threads:
    """The BLAS threads every benchmark ran with, per loaded BLAS library; the parameter records the
    library, its version and the OpenBLAS kernel it chose (OPENBLAS_CORETYPE decides it here)."""

    params = [list(_blas_threads()) or ["none"]]
    param_names = ["blas"]

    def setup(self, blas):
        pin_threads()
        self.threads = _blas_threads()
        if blas not in self.threads:
            raise NotImplementedError(f"{blas} is not loaded in this environment")

    def track_blas_threads(self, blas):
        return self.threads[blas]
    track_blas_threads.unit = "threads"

    def track_pinned_threads(self, blas):
        """The limit the suite asked for (BLAS_THREADS, from OPENBLAS_NUM_THREADS)."""
        return BLAS_THREADS
    track_pinned_threads.unit = "threads"

    def track_numba_threads(self, blas):
        try:
            import numba
        except ImportError as exc:
            raise NotImplementedError("numba is not installed") from exc
        return numba.config.NUMBA_NUM_THREADS
    track_numba_threads.unit = "threads"
