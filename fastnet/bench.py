"""`fastnet bench`: time training steps on synthetic data, per backend, against this machine's sgemm
peak and, when it is importable, PyTorch.

Every measurement (each backend, PyTorch, the sgemm peak) runs in a fresh process of its own:
OpenBLAS's threads keep spinning after a NumPy call and would slow down whatever ran next in the
same process. The sides run several times, interleaved, and the report gives the median, the spread
and how busy other processes kept the CPU, flagging the runs they disturbed. The fastnet sides time
`fastnet.step.train_epoch`, the loop `fastnet train` runs:
gather and normalise uint8 rows, forward, loss, backward, SGD-momentum update.

With `--ranks N`, each backend is also timed data-parallel: N processes under `mpirun`, each on its
share of every batch with the cores shared among them (the side `BACKEND:TxN`, T threads per rank),
as `mpirun -n N fastnet train --distributed` runs. Rank 0's time is the one reported.
"""

import importlib.util
import json
import os
import statistics
import sys
import time
from itertools import pairwise

import numpy as np

from fastnet.cpu import DISTURBED, cpu_model, run_child
from fastnet.distributed import AS_ROOT
from fastnet.precision import bf16_instructions
from fastnet.workloads import MOMENTUM, flops_per_sample, named

INPUT_SIZE, CLASSES = 3072, 10  # CIFAR-10's shape, so the figures compare with real training
WARMUP_STEPS = 10
LR = 0.01
PEAK_SIZES = (1024, 2048)
PRECISION_NAMES = {"fp32": "float32", "bf16": "bf16 mixed precision (PyTorch: torch.autocast bfloat16)"}


def synthetic_batches(sizes, batch, steps):
    rng = np.random.default_rng(0)
    count = batch * (steps + WARMUP_STEPS)
    images = rng.integers(0, 256, (count, sizes[0]), dtype=np.uint8)
    labels = rng.integers(0, sizes[-1], count)
    return images, labels, rng.permutation(count)


def time_fastnet(backend, sizes, batch, steps, threads=None, precision="fp32", parallel=None):
    from fastnet import backends
    from fastnet.model import MLP
    from fastnet.optim import Optimizer, Schedule
    from fastnet.step import StepOptions, train_epoch, warm_up

    options = StepOptions() if parallel is None else StepOptions(**parallel.step_hooks())

    images, labels, order = synthetic_batches(sizes, batch, steps)
    shift, scale = np.full(sizes[0], 127.5, np.float32), np.full(sizes[0], 1 / 64, np.float32)
    started = time.perf_counter()
    net = MLP(sizes, backend=backend, precision=precision)  # imports the backend: part of its start-up
    with backends.use_threads(backend, threads):
        optimizer = Optimizer(net.params, "momentum", momentum=MOMENTUM, backend=backend, copies=net.param_copies)
        warm_up(net, optimizer, images.dtype)
        warmup_seconds = time.perf_counter() - started
        schedule = Schedule("constant", LR, steps + WARMUP_STEPS)
        # Untimed steps first: they allocate the workspace and settle caches and thread pools.
        train_epoch(net, optimizer, schedule, images, labels, shift, scale, order[:batch * WARMUP_STEPS], batch, 1,
                    0, options=options)
        started = time.perf_counter()
        train_epoch(net, optimizer, schedule, images, labels, shift, scale, order[batch * WARMUP_STEPS:], batch, 1,
                    WARMUP_STEPS, options=options)
        seconds = time.perf_counter() - started
        products_seconds = time_products(net, batch, steps) if parallel is None else None
        parallelism = backends.parallelism(backend)
    result = {"seconds": seconds, "warmup_seconds": warmup_seconds, "parallelism": parallelism,
              "precision": net.precision, "products_seconds": products_seconds}
    return result if parallel is None else result | {"distributed": parallel.describe()}


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
    rng = np.random.default_rng(0)
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


def time_torch(sizes, batch, steps, threads=None, precision="fp32"):
    """PyTorch's float32 training step, or under torch.autocast's bfloat16 for precision bf16: what a
    PyTorch user would run for mixed precision on the CPU."""
    import contextlib

    import torch

    torch.set_num_threads(threads or os.cpu_count())
    images, labels, order = synthetic_batches(sizes, batch, steps)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    shift, scale = torch.full((sizes[0],), 127.5), torch.full((sizes[0],), 1 / 64)
    layers = []
    for fan_in, fan_out in pairwise(sizes):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(indices):
        for start in range(0, len(indices), batch):
            rows = torch.from_numpy(indices[start:start + batch])
            x = images[rows].float().sub_(shift).mul_(scale)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), labels[rows])
            loss.backward()
            optimizer.step()

    started = time.perf_counter()
    run(order[:batch * WARMUP_STEPS])
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run(order[batch * WARMUP_STEPS:])
    return {"seconds": time.perf_counter() - started, "warmup_seconds": warmup_seconds,
            "precision": precision}


def sgemm_peak():
    """The best float32 GFLOP/s of NumPy's matmul over a few square sizes, and the BLAS behind it."""
    from threadpoolctl import threadpool_info

    best = 0.0
    for n in PEAK_SIZES:
        a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
        out = np.empty((n, n), np.float32)
        np.matmul(a, b, out=out)
        for _ in range(3):
            started = time.perf_counter()
            np.matmul(a, b, out=out)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - started) / 1e9)
    blas = [f"{lib['internal_api']} {lib.get('architecture') or ''}".strip() for lib in threadpool_info()
            if lib["user_api"] == "blas"]
    return {"gflops": best, "blas": ", ".join(blas)}


def worker(spec):
    """Run one measurement described by `spec` and print it as one JSON line."""
    if spec["side"] == "peak":
        result = sgemm_peak()
    elif spec["side"] == "torch":
        result = time_torch(spec["sizes"], spec["batch"], spec["steps"], spec.get("threads"), spec["precision"])
    else:
        parallel = None
        if spec.get("ranks", 1) > 1:
            from fastnet import distributed
            parallel = distributed.start()
        result = time_fastnet(spec["backend"], spec["sizes"], spec["batch"], spec["steps"], spec.get("threads"),
                              spec["precision"], parallel)
        if parallel is not None and not parallel.writes:
            return
    print(json.dumps(result))


def data_parallel_side(backend, ranks, threads=None):
    """The side name of `backend` on `ranks` ranks: BACKEND:TxN, T the threads of each."""
    return f"{backend}:{max(1, (threads or os.cpu_count()) // ranks)}x{ranks}"


def measure_in_own_process(side, sizes, batch, steps, threads=None, precision="fp32"):
    """One measurement in a fresh process (or, for a data-parallel side, `mpirun -n N` of them), with
    the cores other processes kept busy meanwhile."""
    backend, _, layout = side.partition(":")
    per_rank, _, ranks = layout.partition("x")
    ranks = int(ranks or 1)
    spec = {"side": side, "backend": backend, "sizes": sizes, "batch": batch, "steps": steps,
            "threads": int(per_rank) if ranks > 1 else threads, "precision": precision, "ranks": ranks}
    launch, env = [], None
    if ranks > 1:
        launch = ["mpirun", "-n", str(ranks)]
        if os.geteuid() == 0:
            env = os.environ | AS_ROOT
    done, others = run_child([*launch, sys.executable, "-m", "fastnet.bench", json.dumps(spec)], capture_output=True,
                             text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"other_load": others}


def bench(backend_names, hidden, batch, steps, threads=None, precision="fp32", repeats=3, ranks=None):
    """Measure every side `repeats` times, each time in a process of its own, interleaved (A B C A B C
    ...) so that drift on a shared machine reaches every side alike, on `threads` cores (None: all),
    fastnet's and PyTorch's in `precision`; with `ranks`, each backend data-parallel on that many
    ranks too. Returns the report as a dict: per side the median run, the spread of all runs and the
    most cores other processes kept busy during one."""
    sizes = [INPUT_SIZE, *hidden, CLASSES]
    parallel_sides = [data_parallel_side(b, ranks, threads) for b in backend_names] if ranks and ranks > 1 else []
    sides = list(backend_names) + parallel_sides + (["torch"] if importlib.util.find_spec("torch") else [])
    peak = measure_in_own_process("peak", sizes, batch, steps)
    flops = flops_per_sample(sizes)
    runs = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            runs[side].append(measure_in_own_process(side, sizes, batch, steps, threads, precision))
    results = {}
    for side, timings in runs.items():
        seconds = statistics.median(t["seconds"] for t in timings)
        samples_per_second = batch * steps / seconds
        gflops = flops * samples_per_second / 1e9
        each = sorted(batch * steps / t["seconds"] for t in timings)
        results[side] = {"samples_per_second": samples_per_second, "ms_per_step": seconds / steps * 1e3,
                         "gflops": gflops, "percent_of_peak": 100 * gflops / peak["gflops"],
                         "warmup_seconds": statistics.median(t["warmup_seconds"] for t in timings),
                         "samples_per_second_runs": each, "other_load": max(t["other_load"] for t in timings),
                         "disturbed_runs": sum(t["other_load"] > DISTURBED for t in timings),
                         "precision": timings[0]["precision"]}
        if timings[0].get("products_seconds"):
            results[side]["step_over_products"] = statistics.median(t["seconds"] / t["products_seconds"]
                                                                    for t in timings)
        if "parallelism" in timings[0]:
            results[side]["parallelism"] = timings[0]["parallelism"]
        if "distributed" in timings[0]:
            results[side]["distributed"] = timings[0]["distributed"]
    if "torch" in results:
        for side in [*backend_names, *parallel_sides]:
            results[side]["vs_torch"] = results[side]["samples_per_second"] / results["torch"]["samples_per_second"]
    return {"workload": named(sizes, batch), "sizes": sizes, "batch_size": batch, "steps": steps, "repeats": repeats,
            "threads": threads or os.cpu_count(), "cpu": cpu_model(), "flops_per_sample": flops,
            "precision": precision, "bf16_instructions": bf16_instructions(),
            "sgemm_peak_gflops": peak["gflops"], "blas": peak["blas"], "results": results}


def format_report(report):
    workload = f"{report['workload']} " if report.get("workload") else ""
    repeats = report["repeats"]
    lines = [(f"fastnet bench: {workload}MLP {'-'.join(map(str, report['sizes']))}, "
              f"batch {report['batch_size']}, "
              f"{report['steps']} timed steps on synthetic data, {PRECISION_NAMES[report['precision']]}, SGD with "
              f"momentum; each side in its own process on {report['threads']} threads, {repeats} interleaved "
              f"run{'s' if repeats > 1 else ''} (medians; min-max of samples/s)"),
             f"CPU: {report['cpu']}",
             f"sgemm peak {report['sgemm_peak_gflops']:.0f} GFLOP/s (NumPy float32 matmul; {report['blas']})",
             (f"{'side':<10}{'samples/s':>11}{'min-max':>17}{'ms/step':>9}{'GFLOP/s':>9}{'% peak':>8}{'warm-up s':>11}"
              f"{'vs torch':>10}{'others':>8}")]
    for side, r in report["results"].items():
        versus = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else ""
        spread = f"{r['samples_per_second_runs'][0]:,.0f}-{r['samples_per_second_runs'][-1]:,.0f}"
        lines.append(f"{side:<10}{r['samples_per_second']:>11,.0f}{spread:>17}{r['ms_per_step']:>9.2f}"
                     f"{r['gflops']:>9.1f}{r['percent_of_peak']:>8.1f}{r['warmup_seconds']:>11.2f}{versus:>10}"
                     f"{r['other_load']:>8.2f}")
    for side, r in report["results"].items():
        if "parallelism" in r:
            p = r["parallelism"]
            blas = f"; BLAS {p['blas']}" if "blas" in p else ""
            bf16 = f"; bf16 GEMM {p['bf16_gemm']}" if "bf16_gemm" in p and report["precision"] == "bf16" else ""
            ranks = f" in each of {r['distributed']['ranks']} ranks (mpirun)" if "distributed" in r else ""
            plan = f"; plan {p['plan']}, {p['plan_source']}; idle threads: {p['wait']}" if "plan" in p else ""
            threads = p.get("while_training", f"{p['threads']} threads")
            lines.append(f"{side}: {threads}{ranks}, {p['split']}{blas}{bf16}{plan}")
        if "step_over_products" in r:
            lines.append(f"{side}: a step takes {r['step_over_products']:.2f}x the time of its products alone "
                         "(same shapes and tiles, same process; median of the runs)")
    disturbed = {side: r["disturbed_runs"] for side, r in report["results"].items() if r["disturbed_runs"]}
    if disturbed:
        lines.append(f"disturbed: other processes kept more than {DISTURBED} cores busy during "
                     + ", ".join(f"{n} of {repeats} {side} runs" for side, n in disturbed.items())
                     + " ('others': the most in one run); rerun on an idle machine before comparing")
    if "torch" not in report["results"]:
        lines.append("PyTorch is not importable, so there is no comparison with it (pip install torch)")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
