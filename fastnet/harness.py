"""The one timing harness behind every speed figure: `fastnet bench`, tools/compare_workloads.py and
asv's DataParallel measure a side with `measure` and read its runs with `summarize`.

A side is what runs, written NAME[:T[xR[+overlap]]][@bf16]:
- numpy, numba: that fastnet backend on every core; numba:1 on one (`fastnet train --threads 1`);
- torch: the PyTorch peer, the same model with nn.Linear, F.cross_entropy and torch.optim.SGD (a peer
  to measure against, never a dependency of fastnet);
- @bf16: mixed precision, `fastnet train --precision bf16`, or torch.autocast's bfloat16 for torch;
- NAME:TxR: data-parallel on R ranks of T threads each under mpirun (`fastnet train --distributed
  --threads T`), +overlap adding `--overlap`; rank 0's time is the one reported.
The side "peak" is the float32 sgemm peak of NumPy's (or PyTorch's) matrix product instead; the
sides "sklearn" and "fastnet:BACKEND" time a scikit-learn classifier's fit, scikit-learn's
MLPClassifier or fastnet.sklearn's (tools/compare_sklearn.py).

Every measurement runs in a fresh process of its own (`python -m fastnet.harness SPEC`, one JSON line
out): after a NumPy call OpenBLAS's threads keep spinning for a while and would slow whatever ran
next in the same process, and thread pools, JIT caches and allocator state would leak from one side
into the next. While it runs, /proc/stat tells how many cores other processes kept busy, so that a
disturbed run is flagged rather than believed.

Every training side runs one recipe: float32 (or bf16), SGD with momentum 0.9 (fastnet/workloads.py),
constant learning rate 0.01, no weight decay; untimed warm-up steps, then the timed ones: gather the
uint8 rows, normalise, forward, softmax cross-entropy, backward, update. fastnet's sides go through
fastnet.step.train_epoch, the loop `fastnet train` runs. The data is random uint8 images and labels,
or a dataset's training images (real-data epochs); `steps` None times one whole epoch of them.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from fastnet.cpu import DISTURBED, busy_neighbours, process_seconds, run_child, wait_until_quiet
from fastnet.distributed import AS_ROOT
from fastnet.workloads import DTYPE, MOMENTUM, flops_per_sample, product_flops

LR = 0.01
SEED = 0
WARMUP_STEPS = 10
SYNTHETIC_IMAGES = 50_000  # an epoch of synthetic data is one of CIFAR-10's training set
PEAK_SIZES = (1024, 2048)
SIDE_NAMES = ("numpy", "numba", "torch")  # fastnet's backends and the PyTorch peer


# --- Sides ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    name: str  # a fastnet backend, or torch
    threads: int | None  # per rank; None: every core
    ranks: int = 1
    overlap: bool = False
    precision: str = "fp32"


def parse_side(text):
    """The Side that `text` names, or None where it is not NAME[:T[xR[+overlap]]][@bf16]."""
    rest, at, precision = text.partition("@")
    rest, plus, overlap = rest.partition("+")
    name, colon, layout = rest.partition(":")
    threads, x, ranks = layout.partition("x")
    if name not in SIDE_NAMES or (at and precision != "bf16"):
        return None
    if colon and not (threads.isdigit() and int(threads) > 0):
        return None
    if x and (name == "torch" or not (ranks.isdigit() and int(ranks) > 0)):
        return None
    ranks = int(ranks) if x else 1
    if plus and (overlap != "overlap" or ranks == 1):
        return None
    return Side(name, int(threads) if colon else None, ranks, bool(plus), precision or "fp32")


def skip_reason(text):
    """Why side `text` cannot be measured here (torch does not import, the backend is missing,
    fastnet refuses bf16 on this CPU), or None."""
    side = parse_side(text)
    if side.name == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        # In a child: a torch that imports badly can take the process down with it.
        probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
        return None if probe.returncode == 0 else f"import torch failed: {probe.stderr.strip().splitlines()[-1]}"
    try:
        from fastnet import backends, precision
        backends.get(side.name)
        precision.check(side.precision, side.name)
        return None
    except Exception as exc:  # noqa: BLE001 -- any failure means: report the side as skipped
        return f"{type(exc).__name__}: {exc}"


# --- In the worker: one measurement ----------------------------------------------------------------

@dataclass
class Feed:
    """What a training side trains on, and in which order."""
    images: np.ndarray  # (N, features) uint8
    labels: np.ndarray
    shift: np.ndarray  # float32, per feature: (pixel - shift) * scale standardises it
    scale: np.ndarray
    warm_order: np.ndarray  # the untimed steps' rows
    order: np.ndarray  # the timed steps' rows
    described: str


def feed(sizes, batch, steps, warmup_steps, data="synthetic"):
    """The rows of `warmup_steps` untimed and `steps` timed steps (None: a whole epoch) from `data`:
    "synthetic" (random uint8 images and labels) or a dataset's path."""
    if data == "synthetic":
        rng = np.random.default_rng(SEED)
        count = SYNTHETIC_IMAGES if steps is None else batch * max(steps, warmup_steps)
        images = rng.integers(0, 256, (count, sizes[0]), dtype=np.uint8)
        labels = rng.integers(0, sizes[-1], count)
        # Uniform bytes have mean 127.5 and a standard deviation of about 74.
        shift, scale = np.full(sizes[0], 127.5, DTYPE), np.full(sizes[0], 1 / 64, DTYPE)
        described = "SYNTHETIC random uint8 images and labels"
    else:
        from fastnet import data as datasets
        from fastnet.evaluation import normalizer
        dataset = datasets.load_dataset(data)
        images, labels = dataset.train_images.reshape(len(dataset.train_images), -1), dataset.train_labels
        mean, std = datasets.channel_stats(dataset.train_images)
        shift, scale = normalizer(mean, std, images.shape[1], images.dtype, DTYPE)
        described = dataset.source
    rng = np.random.default_rng(SEED)
    warm_order = rng.permutation(len(images))[:warmup_steps * batch]
    order = rng.permutation(len(images))  # the timed rows: a fresh shuffle, as a new epoch's
    return Feed(images, labels, shift, scale, warm_order, order if steps is None else order[:steps * batch],
                described)


def timing(rows, batch, seconds, cpu_seconds, warmup_seconds, loss_sum, precision, described):
    """What every training side reports of its timed steps over `rows` samples."""
    return {"seconds": seconds, "warmup_seconds": warmup_seconds, "cpu_seconds": cpu_seconds,
            "final_loss": loss_sum / rows, "samples": rows, "steps": math.ceil(rows / batch), "precision": precision,
            "data": described}


def time_fastnet(backend, sizes, batch, steps=None, threads=None, precision="fp32", parallel=None, data="synthetic",
                 warmup_steps=WARMUP_STEPS):
    """fastnet's training steps on `backend`; `parallel`, a fastnet.distributed.DataParallel, makes
    this process one rank of a data-parallel side. The warm-up seconds run from building the model
    (which imports the backend) through compiling its kernels to the end of the untimed steps."""
    from fastnet import backends
    from fastnet.model import MLP
    from fastnet.optim import Optimizer, Schedule
    from fastnet.step import StepOptions, train_epoch, warm_up

    rows = feed(sizes, batch, steps, warmup_steps, data)
    options = StepOptions() if parallel is None else StepOptions(**parallel.step_hooks())
    started = time.perf_counter()
    net = MLP(sizes, backend=backend, dtype=DTYPE, seed=SEED, precision=precision)
    with backends.use_threads(backend, threads):
        optimizer = Optimizer(net.params, "momentum", momentum=MOMENTUM, weight_decay=0.0, backend=backend,
                              copies=net.param_copies)
        warm_up(net, optimizer, rows.images.dtype)
        schedule = Schedule("constant", LR, warmup_steps + math.ceil(len(rows.order) / batch))
        # Untimed steps first: they allocate the workspace and settle caches and thread pools.
        train_epoch(net, optimizer, schedule, rows.images, rows.labels, rows.shift, rows.scale, rows.warm_order,
                    batch, 0, 0, options=options)
        warmup_seconds = time.perf_counter() - started
        if parallel is not None:
            parallel.reduce_seconds = 0.0  # the timed steps' alone
        wall, cpu = time.perf_counter(), time.process_time()
        loss_sum, _, _ = train_epoch(net, optimizer, schedule, rows.images, rows.labels, rows.shift, rows.scale,
                                     rows.order, batch, 1, warmup_steps, options=options)
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        products = time_products(net, batch, math.ceil(len(rows.order) / batch)) if parallel is None else None
        parallelism = backends.parallelism(backend)
    result = timing(len(rows.order), batch, seconds, cpu_seconds, warmup_seconds, loss_sum, net.precision,
                   rows.described) | {"parallelism": parallelism, "products_seconds": products}
    if parallel is not None:  # cpu/wall over the whole job: every rank's CPU seconds, summed
        result |= {"cpu_seconds": float(parallel.sum_in_rank_order([cpu_seconds])[0]),
                   "distributed": parallel.describe() | {"reduce_seconds": parallel.reduce_seconds}}
    return result


def time_products(net, batch, steps):
    """Seconds that `steps` repetitions of the products alone of `net`'s training step take at
    `batch` rows: per layer x @ W, x.T @ dout and, but for the first, dout @ W.T (the backend's
    `products`, cut into its kernels' tiles), on arrays of the step's shapes. The rest of a step's
    time is its elementwise passes, its update and their waits. None for a backend without
    `products`, or in bf16 precision, whose products are another GEMM's."""
    from fastnet import backends

    kernels = backends.get(net.backend)
    if not hasattr(kernels, "products") or net.precision != "fp32":
        return None
    rng = np.random.default_rng(SEED)
    layers = []
    for layer, W in enumerate(net.weights):
        fan_in, fan_out = W.shape
        x = rng.standard_normal((batch, fan_in)).astype(W.dtype)
        dout = rng.standard_normal((batch, fan_out)).astype(W.dtype)
        dx = np.empty_like(x) if layer > 0 else None
        layers.append((x, W, dout, np.empty_like(dout), np.empty_like(W), dx))
    for arrays in layers:  # untimed: compiles and settles the thread pool
        kernels.products(*arrays)
    started = time.perf_counter()
    for _ in range(steps):
        for arrays in layers:
            kernels.products(*arrays)
    return time.perf_counter() - started


def time_torch(sizes, batch, steps=None, threads=None, precision="fp32", data="synthetic",
               warmup_steps=WARMUP_STEPS):
    """PyTorch's training steps, on the rows fastnet's would train on; in bf16, under torch.autocast's
    bfloat16, what a PyTorch user runs for mixed precision on the CPU."""
    import torch
    import torch.nn.functional as F

    rows = feed(sizes, batch, steps, warmup_steps, data)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count())
    started = time.perf_counter()
    torch.manual_seed(SEED)
    layers = []
    for fan_in, fan_out in pairwise(sizes):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    images, labels = torch.from_numpy(rows.images), torch.from_numpy(rows.labels)
    shift, scale = torch.from_numpy(rows.shift), torch.from_numpy(rows.scale)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def train(order):
        loss_sum = 0.0
        for start in range(0, len(order), batch):
            picked = torch.from_numpy(order[start:start + batch])
            x = images[picked].float().sub_(shift).mul_(scale)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x), labels[picked])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(picked)
        return loss_sum

    train(rows.warm_order)
    warmup_seconds = time.perf_counter() - started
    wall, cpu = time.perf_counter(), time.process_time()
    loss_sum = train(rows.order)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    return timing(len(rows.order), batch, seconds, cpu_seconds, warmup_seconds, loss_sum, precision, rows.described) | {
        "torch_threads_default": threads_before, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "torch_mkl": torch.backends.mkl.is_available(),
        "torch_mkldnn": torch.backends.mkldnn.is_available()}


def time_estimator(side, sizes, batch, epochs, train_size, data, threads=None):
    """A scikit-learn classifier's fit, as its users call it, on the first `train_size` training images
    of the dataset at `data` (float32 in [0, 1]), and its accuracy on the test images. `side`
    "sklearn" is scikit-learn's MLPClassifier ("sklearn+scaler" behind a StandardScaler, which
    standardises each feature as fastnet's does), "fastnet:BACKEND[@bf16]" fastnet.sklearn's; all train
    `epochs` epochs of SGD with momentum and the constant lr that every side trains with, from the
    same seed, after an untimed fit of one epoch on a few batches (imports, kernels, thread pools)."""
    import warnings

    from fastnet import data as datasets

    dataset = datasets.load_dataset(data)
    X = dataset.train_images[:train_size].reshape(train_size, -1) / np.float32(255.0)
    y = dataset.train_labels[:train_size]
    test = dataset.test_images.reshape(len(dataset.test_images), -1) / np.float32(255.0)
    hidden = tuple(sizes[1:-1])
    if side.startswith("sklearn"):
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # tol 0 with more patience than epochs: every epoch runs, as fastnet's do.
        classifier = MLPClassifier(hidden, solver="sgd", momentum=MOMENTUM, nesterovs_momentum=False, alpha=0.0,
                                   learning_rate="constant", learning_rate_init=LR, batch_size=batch,
                                   max_iter=1, tol=0.0, n_iter_no_change=epochs + 1, random_state=SEED)
        precision = "fp32"
    else:
        from fastnet.sklearn import MLPClassifier

        backend, _, precision = side.removeprefix("fastnet:").partition("@")
        precision = precision or "fp32"
        classifier = MLPClassifier(hidden, max_iter=1, batch_size=batch, optimizer="momentum", momentum=MOMENTUM,
                                   lr=LR, schedule="constant", weight_decay=0.0, backend=backend, threads=threads,
                                   precision=precision, random_state=SEED)
    model = make_pipeline(StandardScaler(), classifier) if side == "sklearn+scaler" else classifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning: a fixed number of epochs is the point
        started = time.perf_counter()
        model.fit(X[:4 * batch], y[:4 * batch])
        warmup_seconds = time.perf_counter() - started
        classifier.set_params(max_iter=epochs)
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(X, y)
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    rows = train_size * epochs
    accuracy = float(model.score(test, dataset.test_labels))
    # fastnet's run times its epochs alone: the rest of the fit is the estimator's own cost.
    run = getattr(classifier, "_run", None)
    epoch_seconds = None if run is None else sum(m["epoch_seconds"] for m in run.progress.history)
    return timing(rows, batch, seconds, cpu_seconds, warmup_seconds, classifier.loss_ * rows, precision,
                  dataset.source) | {"epochs": epochs, "test_accuracy": accuracy, "blas": blas_libraries(),
                                     "epochs_seconds": epoch_seconds}


def sgemm_peak(lib="numpy", sizes=PEAK_SIZES):
    """The best float32 GFLOP/s of NumPy's (or PyTorch's) matrix product on every core over square
    `sizes`, the best of several repetitions each, and the BLAS behind it."""
    if lib == "torch":
        import torch
        torch.set_num_threads(os.cpu_count())
    by_size = {}
    for n in sizes:
        a, b = (np.random.default_rng(n).standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        if lib == "torch":
            product = functools.partial(torch.mm, torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
        else:
            product = functools.partial(np.matmul, a, b, out=out)
        product()  # untimed: starts the threads, touches the pages
        seconds = []
        for _ in range(3 if n >= 4096 else 5):
            started = time.perf_counter()
            product()
            seconds.append(time.perf_counter() - started)
        by_size[n] = product_flops(n, n, n) / min(seconds) / 1e9
    size = max(by_size, key=by_size.get)
    return {"lib": lib, "gflops": by_size[size], "size": size, "by_size": by_size, "blas": blas_libraries()}


def blas_libraries():
    """The BLAS libraries this process has loaded, as describe_pools says them."""
    from threadpoolctl import threadpool_info

    return describe_pools(threadpool_info())


def describe_pools(pools, blas_only=True):
    """One line of thread pools as threadpoolctl (or thread_pools) lists them: each library, its
    version, its kernel type where it has one (OpenBLAS's) and its threads, e.g. "openblas 0.3.31
    SkylakeX (2 threads)"; the BLAS libraries alone unless `blas_only` is False. Every tool that
    names the BLAS beside a figure says it so."""
    def described(pool):
        named = (pool["internal_api"], pool.get("version"), pool.get("architecture"))
        threads = pool["num_threads"]
        return " ".join(str(part) for part in named if part) + f" ({threads} thread{'s' * (threads != 1)})"

    return ", ".join(described(pool) for pool in pools if not blas_only or pool.get("user_api") == "blas")


def thread_pools():
    """Thread pools and OS threads of this process, as seen at the end of its measurement."""
    from threadpoolctl import threadpool_info

    pools = [{k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture")}
             for p in threadpool_info()]
    return {"threadpools": pools, "os_threads": len(os.listdir("/proc/self/task"))}


def worker(spec):
    """Take the measurement `spec` describes (see measure) and print it as one JSON line; a rank
    other than 0 of a data-parallel side prints nothing."""
    if spec["side"] == "peak":
        result = sgemm_peak(spec["lib"], spec["sizes"])
    elif "epochs" in spec:
        result = time_estimator(spec["side"], spec["sizes"], spec["batch"], spec["epochs"], spec["train_size"],
                                spec["data"], spec.get("threads"))
    else:
        side = parse_side(spec["side"])
        shape = spec["sizes"], spec["batch"], spec["steps"]
        if side.name == "torch":
            result = time_torch(*shape, side.threads, side.precision, spec["data"], spec["warmup_steps"])
        else:
            parallel = None
            if side.ranks > 1:  # under mpirun: this process is one rank
                from fastnet import distributed
                parallel = distributed.start(overlap=side.overlap)
            result = time_fastnet(side.name, *shape, side.threads, side.precision, parallel, spec["data"],
                                  spec["warmup_steps"])
            if parallel is not None and not parallel.writes:
                return
    print(json.dumps(result | {"side": spec["side"]} | thread_pools()))


# --- In the parent: a fresh process a measurement, and what it tells ------------------------------

def measure(spec, quiet_wait=0.0, neighbours=0, mpirun_args=()):
    """Take one measurement in a fresh process (`mpirun -n R` of them for a side on R ranks) and return
    its result, or {"error": why} when it failed, either with "other_load", how many cores other
    processes kept busy meanwhile, and "neighbour_load", how many the `neighbours` busy one-core
    processes started beside it got.

    spec: {"side": SIDE, "sizes", "batch", "steps" (None: an epoch), "warmup_steps", "data"
    ("synthetic" or a dataset's path)}, or {"side": "peak", "lib": "numpy" or "torch", "sizes"}, or
    for a scikit-learn classifier's fit (time_estimator) {"side": "sklearn" or "fastnet:BACKEND[@bf16]",
    "sizes", "batch", "epochs", "train_size", "data" (a dataset's path), "threads"}.
    quiet_wait: first wait up to that many seconds for an idle second."""
    if quiet_wait:
        wait_until_quiet(quiet_wait)
    side = parse_side(spec["side"])  # None: the peak, or a scikit-learn classifier
    ranks = 1 if side is None else side.ranks
    launch = ["mpirun", *mpirun_args, "-n", str(ranks)] if ranks > 1 else []
    env = os.environ | (AS_ROOT if ranks > 1 and os.geteuid() == 0 else {})
    with busy_neighbours(neighbours) as spinners:
        before, started = [process_seconds(p.pid) for p in spinners], time.perf_counter()
        done, others = run_child([*launch, sys.executable, "-m", "fastnet.harness", json.dumps(spec)],
                                 capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        neighbour_load = sum(process_seconds(p.pid) - b for p, b in zip(spinners, before, strict=True)) / wall
    loads = {"other_load": max(others - neighbour_load, 0.0), "neighbour_load": neighbour_load}
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the {spec['side']} measurement exited {done.returncode}: {tail}"} | loads
    return json.loads(done.stdout.strip().splitlines()[-1]) | loads


def summarize(runs, sizes, peak_gflops=None):
    """One side's figures from its runs (measure's results, none of them an error): the median run's
    speed, the spread of them all and how much other processes disturbed them."""
    seconds = sorted(r["seconds"] for r in runs)
    median = statistics.median(seconds)
    samples, steps = runs[0]["samples"], runs[0]["steps"]
    speed = samples / median
    gflops = flops_per_sample(sizes) * speed / 1e9
    summary = {"samples_per_second": speed, "ms_per_step": median / steps * 1e3, "gflops": gflops,
               "percent_of_peak": 100 * gflops / peak_gflops if peak_gflops else None,
               "seconds": median, "seconds_runs": seconds,
               "samples_per_second_runs": [samples / s for s in seconds[::-1]],
               "warmup_seconds": statistics.median(r["warmup_seconds"] for r in runs),
               "cpu_per_wall": statistics.median(r["cpu_seconds"] / r["seconds"] for r in runs),
               "final_loss": statistics.median(r["final_loss"] for r in runs),
               "finite_loss": all(math.isfinite(r["final_loss"]) for r in runs),
               "other_load": max(r["other_load"] for r in runs),
               "neighbour_load": statistics.median(r["neighbour_load"] for r in runs),
               "disturbed_runs": sum(r["other_load"] > DISTURBED for r in runs), "precision": runs[0]["precision"]}
    if all(r.get("products_seconds") for r in runs):
        summary["step_over_products"] = statistics.median(r["seconds"] / r["products_seconds"] for r in runs)
    return summary | {key: runs[0][key] for key in ("parallelism", "distributed") if key in runs[0]}


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
