"""Compare fastnet's backends with PyTorch on two fixed training workloads, one epoch each.

    python tools/compare_workloads.py [--workloads R1,R2] [--sides numpy,numba,numba:1,torch]
                                      [--repeats 3] [--data PATH] [--json FILE] [--quiet-wait 60]
                                      [--neighbours 0,1]

R1 (an MLP 3072-512-512-10 with batch 128) and R2 (3072-128-10, batch 64) are defined in
fastnet/workloads.py; each trains one epoch of the 50,000 CIFAR-10 training images in float32 with
SGD, momentum 0.9, constant lr 0.01, no weight decay: shuffle, gather uint8 rows, normalise, forward,
softmax cross-entropy, backward, update. The numpy and numba sides run `fastnet.step.train_epoch`,
the code path of `fastnet train`; the torch side (when torch imports; it is a peer to measure
against, not a dependency) runs the same model with nn.Linear, F.cross_entropy and torch.optim.SGD on
2 threads. A side `NAME:N` runs backend NAME on N cores (`fastnet train --threads N`); a plain name
uses them all. A side ending in `@bf16` trains in mixed precision: `fastnet train --precision bf16`
for fastnet's backends (skipped where fastnet refuses it), torch.autocast's bfloat16 for torch; e.g.
--sides numba,numba@bf16,torch@bf16. A side `NAME:TxR` trains data-parallel on R ranks of T threads
each (`mpirun -n R fastnet train --distributed --threads T`, fastnet.distributed), e.g. numba:1x2
against numba on a 2-core machine; its worker is started under mpirun, and rank 0's epoch is the one
reported; `NAME:TxR+overlap` adds `--overlap`. --mpirun-args passes options to mpirun, e.g.
"--mca btl tcp,self" to send over TCP.

Every measurement runs in its own fresh process (`--worker SIDE WORKLOAD`, one JSON line out):
after a NumPy call OpenBLAS's threads keep spinning for a while and slow whatever runs next in the
same process, and each library's thread pools, JIT caches and allocator state would otherwise leak
from one side into the next. Repeats are interleaved (A B C A B C ...) so that drift on a shared,
noisy machine hits every side alike; the table shows the median epoch and the min-max spread. The
sgemm peak that "% peak" refers to is measured the same way, in its own processes, in the same run.
Other processes on the machine are the biggest source of noise (OpenBLAS's two spinning threads
slow down many times over when a third process takes a core), so before each worker the script
waits for an idle second (--quiet-wait), and it reports how many cores others kept busy meanwhile
("others" column), flagging disturbed runs.
Without CIFAR-10 (--data, or data/) the workers train on random uint8 images, and say so.
--neighbours 0,1 runs every side quiet and beside one busy one-core process (fastnet.cpu.busy_neighbours),
interleaved, and compares each side beside it with the quiet one-core numba: what a user with other
work on the machine gets.
"""

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the path is set (fastnet needs no extra setup):
from fastnet.bench import time_products  # noqa: E402
from fastnet.cpu import DISTURBED as BUSY  # noqa: E402
from fastnet.cpu import busy_neighbours, cpu_model, process_seconds, run_child, wait_until_quiet  # noqa: E402
from fastnet.distributed import AS_ROOT  # noqa: E402
from fastnet.workloads import MOMENTUM, WORKLOADS  # noqa: E402

GOALS = {"R1": {("numba", "torch"): 1.5, ("numba", "numba:1"): 1.85,
                # on a CPU with AMX (the mixed-precision issue); on AVX512-BF16 alone, reported only
                ("numba@bf16", "numba"): 2.0, ("numba@bf16", "torch@bf16"): 1.5},
         "R2": {("numba", "torch"): 1.5}}
# Beside a busy neighbour (--neighbours 0,1): never slower than one quiet core, and far ahead of PyTorch.
NEIGHBOUR_GOALS = {("numba", "numba:1 (quiet)"): 1.0, ("numba", "torch"): 2.5, ("numba", "numba (quiet)"): None,
                   ("numba:1", "numba:1 (quiet)"): None, ("torch", "torch (quiet)"): None}
PEAK_GOAL = {"R1": ("numba", 70.0)}  # numba's useful GFLOP/s as a percentage of the sgemm peak
# A quiet epoch's steps against the same steps' products alone (same tiles): what the rest costs.
PRODUCTS_GOAL = {"R1": ("numba", 1.1)}
PAIRS = (("numba", "torch"), ("numba", "numpy"), ("numpy", "torch"), ("numba", "numba:1"), ("numba@bf16", "numba"),
         ("numba@bf16", "torch@bf16"), ("torch@bf16", "torch"), ("numba:1x2", "numba"), ("numpy:1x2", "numpy"),
         ("numba:1x2+overlap", "numba:1x2"))
LR, WARMUP_STEPS, SEED, SYNTHETIC_N = 0.01, 20, 0, 50_000
PEAK_SIZES, THREADS = (1024, 2048, 3072, 4096), 2


# --- Workers: each runs in a fresh process and prints one JSON line -------------------------------

def load_images(source):
    """(images2d uint8 (N, 3072), labels int64, channel-last 4-D view, description)."""
    import numpy as np
    if source == "synthetic":
        rng = np.random.default_rng(SEED)
        images = rng.integers(0, 256, (SYNTHETIC_N, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, SYNTHETIC_N).astype(np.int64)
        return images.reshape(len(images), -1), labels, images, "SYNTHETIC random uint8 images and labels"
    from fastnet import data
    ds = data.load_dataset(source)
    return ds.train_images.reshape(len(ds.train_images), -1), ds.train_labels, ds.train_images, ds.source


def split_side(side):
    """(backend or 'torch', threads or None, precision) of a side such as 'numba:1@bf16'; None for a
    malformed side."""
    side, at, precision = side.partition("@")
    side, plus, overlap = side.partition("+")
    if plus and (overlap != "overlap" or ranks_of(side) == 1):
        return None
    name, colon, threads = side.partition(":")
    threads, x, ranks = threads.partition("x")
    if name not in ("numpy", "numba", "torch") or colon and not (threads.isdigit() and int(threads) > 0):
        return None
    if at and precision != "bf16" or x and (name == "torch" or not (ranks.isdigit() and int(ranks) > 0)):
        return None
    return name, int(threads) if colon else None, precision or "fp32"


def ranks_of(side):
    """R of a data-parallel side NAME:TxR; 1 for the others."""
    return int(side.partition("@")[0].partition("+")[0].partition(":")[2].partition("x")[2] or 1)


def worker_train(side, workload, source):
    import numpy as np

    from fastnet import backends, data, evaluation, step
    backend, threads, precision = split_side(side)
    images2d, labels, images, described = load_images(source)
    mean, std = data.channel_stats(images)
    shift, scale = evaluation.normalizer(mean, std, images2d.shape[1], images2d.dtype, "float32")
    sizes, batch = WORKLOADS[workload].sizes, WORKLOADS[workload].batch_size
    rng = np.random.default_rng(SEED)
    options, parallel = step.StepOptions(), None
    if ranks_of(side) > 1:  # under mpirun: this process is one rank
        from fastnet import distributed
        parallel = distributed.start(overlap=side.partition("@")[0].endswith("+overlap"))
        options = step.StepOptions(**parallel.step_hooks())
    warm_order = rng.permutation(len(images2d))[:WARMUP_STEPS * batch]
    order = rng.permutation(len(images2d))  # the timed epoch's fresh permutation
    steps = math.ceil(len(order) / batch)
    result = {"side": side, "workload": workload, "data": described, "samples": len(order), "steps": steps}
    if backend == "torch":
        result |= torch_epoch(sizes, batch, images2d, labels, shift, scale, warm_order, order, threads or THREADS,
                              precision)
    else:
        from fastnet.model import MLP
        from fastnet.optim import Optimizer, Schedule
        net = MLP(sizes, backend=backend, dtype="float32", seed=rng, precision=precision)
        with backends.use_threads(backend, threads):
            opt = Optimizer(net.params, "momentum", momentum=MOMENTUM, weight_decay=0.0, backend=backend,
                            copies=net.param_copies)
            sched = Schedule("constant", LR, steps + WARMUP_STEPS)
            t0 = time.perf_counter()
            step.train_epoch(net, opt, sched, images2d, labels, shift, scale, warm_order, batch, 0, 0,
                              options=options)
            t1, c1 = time.perf_counter(), time.process_time()
            if parallel is not None:
                parallel.reduce_seconds = 0.0  # the timed epoch's alone
            loss_sum, _, _ = step.train_epoch(net, opt, sched, images2d, labels, shift, scale, order, batch, 1,
                                               WARMUP_STEPS, options=options)
            t2, c2 = time.perf_counter(), time.process_time()
            result |= {"warmup_seconds": t1 - t0, "epoch_seconds": t2 - t1, "cpu_seconds": c2 - c1,
                       "final_loss": loss_sum / len(order), "parallelism": backends.parallelism(backend)}
            if parallel is None:  # the epoch's products alone, same tiles, right after it
                result["products_seconds"] = time_products(net, batch, steps)
        if parallel is not None:
            # cpu/wall over the whole job: every rank's CPU seconds, summed
            reduce_seconds = parallel.reduce_seconds
            result |= parallel.describe() | {"cpu_seconds": float(parallel.sum_in_rank_order([c2 - c1])[0]),
                                             "reduce_seconds": reduce_seconds}
            if not parallel.writes:
                return None
    return result | worker_env()


def torch_epoch(sizes, batch, images2d, labels, shift, scale, warm_order, order, threads, precision="fp32"):
    import contextlib

    import torch
    import torch.nn.functional as F
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    layers = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    model = torch.nn.Sequential(*layers).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    images_t, labels_t = torch.from_numpy(images2d), torch.from_numpy(labels)
    mean_t, inv_std_t = torch.from_numpy(shift), torch.from_numpy(scale)

    def autocast():  # bfloat16 autocast, as a PyTorch user trains in mixed precision on the CPU
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def epoch(order_np):
        order_t, loss_sum = torch.from_numpy(order_np), 0.0
        for start in range(0, len(order_t), batch):
            idx = order_t[start:start + batch]
            x = images_t[idx].float()
            x.sub_(mean_t).mul_(inv_std_t)
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x), labels_t[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        return loss_sum

    t0 = time.perf_counter()
    epoch(warm_order)
    t1, c1 = time.perf_counter(), time.process_time()
    loss_sum = epoch(order)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"warmup_seconds": t1 - t0, "epoch_seconds": t2 - t1, "cpu_seconds": c2 - c1,
            "final_loss": loss_sum / len(order), "torch_threads_default": threads_before,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_mkl": torch.backends.mkl.is_available(), "torch_mkldnn": torch.backends.mkldnn.is_available()}


def worker_env():
    """Thread pools and OS threads of this process, as seen at the end of its measurement."""
    import threadpoolctl
    pools = [{k: p.get(k) for k in ("internal_api", "prefix", "version", "num_threads", "architecture")}
             for p in threadpoolctl.threadpool_info()]
    return {"threadpools": pools, "os_threads": len(os.listdir("/proc/self/task"))}


def worker_peak(lib):
    """Best sgemm GFLOP/s over a few square sizes, best of several repetitions each."""
    import numpy as np
    if lib == "torch":
        import torch
        torch.set_num_threads(THREADS)
    best = {}
    for n in PEAK_SIZES:
        a, b = (np.random.default_rng(n).standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        if lib == "torch":
            a, b, out = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
            mm = functools.partial(torch.mm, a, b, out=out)  # this size's operands, bound now
        else:
            mm = functools.partial(np.matmul, a, b, out=out)
        mm()  # warm-up: thread start, page faults
        times = []
        for _ in range(3 if n >= 4096 else 5):
            t = time.perf_counter()
            mm()
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    size = max(best, key=best.get)
    return {"lib": lib, "gflops": best[size], "size": size, "by_size": best} | worker_env()


# --- Parent: plan, run the workers interleaved, report ---------------------------------------------

def run_worker(*args, quiet_wait=0.0, mpirun_args=(), neighbours=0):
    """Run one worker beside `neighbours` busy processes; also measure how many cores OTHER processes
    (the neighbours among them) kept busy meanwhile."""
    if quiet_wait:
        wait_until_quiet(quiet_wait)
    ranks = ranks_of(args[0]) if args[0] != "peak" else 1
    launch = ["mpirun", *mpirun_args, "-n", str(ranks)] if ranks > 1 else []
    env = os.environ | (AS_ROOT if ranks > 1 and os.geteuid() == 0 else {})
    with busy_neighbours(neighbours) as spinners:
        before, started = [process_seconds(p.pid) for p in spinners], time.perf_counter()
        proc, others = run_child([*launch, sys.executable, str(Path(__file__).resolve()), "--worker", *args],
                                 cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        neighbour_load = sum(process_seconds(p.pid) - b for p, b in zip(spinners, before, strict=True)) / wall
    others = {"other_load": max(others - neighbour_load, 0.0), "neighbour_load": neighbour_load}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker {' '.join(args)} exited {proc.returncode}: {tail}"} | others
    return json.loads(proc.stdout.strip().splitlines()[-1]) | others


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def skip_reason(side):
    side, _, precision = split_side(side)
    if side == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
        return None if probe.returncode == 0 else f"import torch failed: {probe.stderr.strip().splitlines()[-1]}"
    try:
        from fastnet import backends
        from fastnet import precision as precisions
        backends.get(side)
        precisions.check(precision, side)
        return None
    except Exception as exc:  # noqa: BLE001 -- any failure means: report the side as skipped
        return f"{type(exc).__name__}: {exc}"


def resolve_data(path):
    from fastnet import data
    if path is not None:
        data.find_dataset(path)  # a --data that is not a dataset is an error, not a silent fallback
        return str(Path(path).resolve())
    default = ROOT / data.default_data_path()
    try:
        data.find_dataset(default)
        return str(default)
    except Exception:  # noqa: BLE001
        return "synthetic"


def print_env(sides, results, peaks):
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores")
    print(f"python {sys.version.split()[0]}; numpy {version('numpy')}; numba {version('numba')}; "
          f"torch {version('torch')}; threadpoolctl {version('threadpoolctl')}")
    env = {k: v for k, v in sorted(os.environ.items())
           if k.split("_")[0] in ("OPENBLAS", "OMP", "MKL", "NUMBA", "GOTO", "KMP", "FASTNET")}
    print(f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '(unset)')}; thread/BLAS environment: "
          + (", ".join(f"{k}={v}" for k, v in env.items()) or "(none set)"))
    print(f"thread settings: torch.set_num_threads({THREADS}) unless a side says :N; fastnet sides as listed below")
    for key, r in [(f"{s} worker", next((m for m in results if m.get("side") == s), None)) for s in sides] + \
                  [(f"{lib} sgemm peak worker", p) for lib, p in peaks.items()]:
        if r and "threadpools" in r:
            pools = "; ".join(f"{p['internal_api']} {p['version'] or ''} {p['num_threads']} threads"
                              + (f" arch {p['architecture']}" if p.get("architecture") else "")
                              for p in r["threadpools"])
            extra = ""
            if "torch_threads" in r:
                extra = (f"; torch threads {r['torch_threads_default']} by default, {r['torch_threads']} set, "
                         f"interop {r['torch_interop_threads']}, MKL {r['torch_mkl']}, oneDNN {r['torch_mkldnn']}")
            if "parallelism" in r:
                p = r["parallelism"]
                extra = f"; {p['threads']} threads: {p['split']}" + (f", BLAS {p['blas']}" if "blas" in p else "")
            print(f"  {key}: {pools}; {r['os_threads']} OS threads at the end{extra}")


def report(workload, sides, results, skipped, peak, repeats, neighbours=0):
    """Print one workload's table under one neighbour count; return its samples/s by side."""
    sizes, batch = WORKLOADS[workload].sizes, WORKLOADS[workload].batch_size
    fps = WORKLOADS[workload].flops_per_sample
    beside = f", beside {neighbours} busy process{'es' if neighbours > 1 else ''}" if neighbours else ", quiet"
    print(f"\n{workload}  MLP {'-'.join(map(str, sizes))}, batch {batch}, one epoch{beside} "
          f"(median of {repeats} runs, each in its own process); {fps / 1e6:.3f} MFLOP per sample")
    print(f"{'side':<12}{'samples/s':>11}{'ms/step':>9}{'GFLOP/s':>9}{'% peak':>8}{'epoch s (min-max)':>24}"
          f"{'warm-up s':>11}{'final loss':>12}{'cpu/wall':>9}{'others':>8}{'neighbours':>11}")
    speed = {}
    for side in sides:
        if side in skipped:
            print(f"{side:<12}skipped: {skipped[side]}")
            continue
        runs = [r for r in results if r.get("side") == side and r.get("workload") == workload]
        errors = [r["error"] for r in results if r.get("key") == (side, workload, neighbours) and "error" in r]
        if errors:
            print(f"{side:<12}FAILED {len(errors)} of {repeats}: {errors[0]}")
        if not runs:
            continue
        secs = [r["epoch_seconds"] for r in runs]
        median = statistics.median(secs)
        speed[side] = runs[0]["samples"] / median
        gflops = fps * speed[side] / 1e9
        cpu = statistics.median(r["cpu_seconds"] / r["epoch_seconds"] for r in runs)
        losses = statistics.median(r["final_loss"] for r in runs)
        print(f"{side:<12}{speed[side]:>11,.0f}{median * 1e3 / runs[0]['steps']:>9.2f}{gflops:>9.1f}"
              f"{(f'{100 * gflops / peak:.1f}' if peak else 'n/a'):>8}"
              f"{f'{median:.2f} ({min(secs):.2f}-{max(secs):.2f})':>24}"
              f"{statistics.median(r['warmup_seconds'] for r in runs):>11.2f}{losses:>12.3f}{cpu:>9.2f}"
              f"{statistics.median(r['other_load'] for r in runs):>8.2f}"
              f"{statistics.median(r['neighbour_load'] for r in runs):>11.2f}")
        if all(r.get("products_seconds") for r in runs):
            over = statistics.median(r["epoch_seconds"] / r["products_seconds"] for r in runs)
            goal = PRODUCTS_GOAL.get(workload, (None, None))
            verdict = (f" (goal <= {goal[1]:.1f}x: {'met' if over <= goal[1] else 'NOT met'})"
                       if goal[0] == side and not neighbours else "")
            print(f"       {side}: the epoch took {over:.2f}x its products alone (same shapes and tiles){verdict}")
        if not all(math.isfinite(r["final_loss"]) for r in runs):
            print(f"       WARNING: {side} ended an epoch with a non-finite loss")
        if noisy := sum(r["other_load"] > BUSY for r in runs):
            print(f"       WARNING: other processes kept > {BUSY} cores busy during {noisy} of {len(runs)} {side} runs")
    parts = []
    for a, b in PAIRS:
        if a in speed and b in speed:
            ratio = speed[a] / speed[b]
            goal = GOALS[workload].get((a, b))
            verdict = f" (goal >= {goal:.1f}x: {'met' if ratio >= goal else 'NOT met'})" if goal else ""
            parts.append(f"{a}/{b} {ratio:.2f}{verdict}")
        elif (a, b) in GOALS[workload]:
            parts.append(f"{a}/{b} n/a (goal >= {GOALS[workload][(a, b)]:.1f}x: not measured)")
    print("ratios (samples/s, >1: first is faster): " + ("   ".join(parts) or "none"))
    if workload in PEAK_GOAL and PEAK_GOAL[workload][0] in speed and peak:
        side, goal = PEAK_GOAL[workload]
        percent = 100 * fps * speed[side] / 1e9 / peak
        print(f"{side} at {percent:.1f} % of the sgemm peak "
              f"(goal >= {goal:.0f} %: {'met' if percent >= goal else 'NOT met'})")
    return speed


def report_neighbours(workload, speeds, counts):
    """Each side beside its neighbours against a quiet side or a side beside the same: what a user
    with other work on the machine gets."""
    quiet, parts = speeds.get((workload, 0), {}), []
    for n in (n for n in counts if n):
        busy = speeds[workload, n]
        for (a, b), goal in NEIGHBOUR_GOALS.items():
            name, against_quiet = b.removesuffix(" (quiet)"), b.endswith(" (quiet)")
            reference = quiet if against_quiet else busy
            if a in busy and name in reference:
                ratio = busy[a] / reference[name]
                verdict = f" (goal >= {goal:.1f}x: {'met' if ratio >= goal else 'NOT met'})" if goal else ""
                parts.append(f"{a} beside {n} / {b if against_quiet else f'{b} beside {n}'} {ratio:.2f}{verdict}")
    print(f"{workload} beside neighbours: " + ("   ".join(parts) or "no pair measured"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="R1,R2")
    parser.add_argument("--sides", default="numpy,numba,numba:1,torch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="CIFAR-10 archive, batches folder or .npy folder (default: data/)")
    parser.add_argument("--json", help="write every raw measurement to this file")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                        help="before each worker, wait up to S seconds for the machine to be idle (0: don't)")
    parser.add_argument("--neighbours", default="0", metavar="N[,N...]",
                        help="run every side beside N busy one-core processes, for each N listed, interleaved "
                             "(e.g. 0,1: quiet and beside one; the sgemm peak is measured without them)")
    parser.add_argument("--mpirun-args", default="", metavar="ARGS",
                        help="options for mpirun before -n, for the data-parallel sides (e.g. \"--mca btl tcp,self\")")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = worker_peak(rest[0]) if kind == "peak" else worker_train(kind, rest[0], args.data)
        if result is not None:  # None: a rank other than 0 of a data-parallel side
            print(json.dumps(result))
        return

    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS] + [s for s in sides if split_side(s) is None]
    try:
        neighbour_counts = [int(n) for n in args.neighbours.split(",")]
    except ValueError:
        neighbour_counts = [-1]
    if unknown or args.repeats < 1 or min(neighbour_counts) < 0:
        parser.error(f"unknown workloads/sides {unknown}, --repeats < 1 or --neighbours not a list of counts >= 0")
    try:
        source = resolve_data(args.data)
    except Exception as exc:  # noqa: BLE001 -- fastnet's DataError says what is wrong with the path
        parser.error(f"--data {args.data}: {exc}")
    reasons = {s: skip_reason(s) for s in {*sides, "torch"}}
    skipped = {s: reasons[s] for s in sides if reasons[s]}
    synthetic = "SYNTHETIC random uint8 images (50,000 x 3072) and labels: no CIFAR-10 found"
    print(f"data: {synthetic if source == 'synthetic' else source}")
    print(f"recipe: float32, SGD momentum {MOMENTUM}, constant lr {LR}, no weight decay, "
          f"{WARMUP_STEPS} untimed warm-up steps, then one timed epoch")
    if any(neighbour_counts):
        print(f"neighbours: each side runs beside {' and '.join(map(str, neighbour_counts))} busy one-core "
              f"process(es) (`while True: pass`), started after the quiet wait; 'neighbours' gives the cores they got")

    peaks = {lib: run_worker("peak", lib, quiet_wait=args.quiet_wait)
             for lib in ("numpy", "torch") if not reasons.get(lib)}
    for lib, p in peaks.items():
        if "error" in p:
            print(f"sgemm peak {lib}: {p['error']}")
        else:
            sizes = ", ".join(f"{n}: {g:.0f}" for n, g in p["by_size"].items())
            arch = ", ".join(f"{t['internal_api']} {t['architecture']}"
                             for t in p["threadpools"] if t.get("architecture"))
            print(f"sgemm peak {lib}: {p['gflops']:.1f} GFLOP/s at {p['size']}x{p['size']}  (by size: {sizes}; "
                  f"loaded: {arch or 'no OpenBLAS'}; others kept {p['other_load']:.2f} cores busy)")
    good = {lib: p["gflops"] for lib, p in peaks.items() if "error" not in p}
    ref = max(good, key=good.get) if good else None
    if ref:
        print(f"reference peak for '% peak': {good[ref]:.1f} GFLOP/s ({ref} sgemm, the larger of those measured)")

    results, started = [], time.perf_counter()
    run_sides = [s for s in sides if s not in skipped]
    for r in range(args.repeats):
        for workload in workloads:
            for neighbours in neighbour_counts:
                for side in run_sides:
                    res = run_worker(side, workload, "--data", source, quiet_wait=args.quiet_wait,
                                     mpirun_args=args.mpirun_args.split(), neighbours=neighbours)
                    res |= {"repeat": r + 1, "neighbours": neighbours}
                    res |= {"key": (side, workload, neighbours)} if "error" in res else {}
                    results.append(res)
                    shown = f"{res['epoch_seconds']:.2f} s" if "epoch_seconds" in res else res["error"]
                    beside = f", beside {neighbours} busy" if neighbours else ""
                    print(f"  run {r + 1}/{args.repeats} {workload} {side:<8} {shown}  (other processes kept "
                          f"{res['other_load']:.2f} cores busy{beside})", flush=True)
    if any("data" in r for r in results):
        print(f"workers trained on: {next(r['data'] for r in results if 'data' in r)}")
    print()
    print_env(sides, results, peaks)
    speeds = {}
    for workload in workloads:
        for neighbours in neighbour_counts:
            these = [r for r in results if r["neighbours"] == neighbours]
            speeds[workload, neighbours] = report(workload, sides, these, skipped, good.get(ref), args.repeats,
                                                  neighbours)
        if len(neighbour_counts) > 1:
            report_neighbours(workload, speeds, neighbour_counts)
    print("cpu/wall: CPU seconds of the worker per second of its epoch (2.0 = both cores); others: cores that "
          "OTHER processes on the machine kept busy during the worker (should be ~0 for clean numbers); "
          "neighbours: cores that --neighbours' processes got")
    print(f"\ntotal wall time of the workers: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": source, "skipped": skipped, "peaks": peaks, "reference_peak": ref,
                       "measurements": [{k: v for k, v in r.items() if k != "key"} for r in results]}, f, indent=1)
        print(f"raw measurements written to {args.json}")


if __name__ == "__main__":
    main()
