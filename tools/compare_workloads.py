"""Compare fastnet's backends with PyTorch on two fixed training workloads, one epoch each.

    python tools/compare_workloads.py [--workloads R1,R2] [--sides numpy,numba,numba:1,torch]
                                      [--repeats 3] [--data PATH] [--json FILE] [--quiet-wait 60]
                                      [--neighbours 0,1]

R1 (an MLP 3072-512-512-10 with batch 128) and R2 (3072-128-10, batch 64) are defined in
fastnet/workloads.py; each side trains one epoch of the 50,000 CIFAR-10 training images after 20
untimed warm-up steps, in fastnet.harness, the harness `fastnet bench` measures with too: float32,
SGD, momentum 0.9, constant lr 0.01, no weight decay; shuffle, gather uint8 rows, normalise, forward,
softmax cross-entropy, backward, update. This script is its driver: which sides and workloads, the
goals, the interleaving and the report.

A side is one of fastnet.harness's: numpy and numba run `fastnet.step.train_epoch`, the code path of
`fastnet train`; torch (when torch imports; it is a peer to measure against, not a dependency) runs
the same model with nn.Linear, F.cross_entropy and torch.optim.SGD. A side `NAME:N` runs on N cores
(`fastnet train --threads N`); a plain name uses them all. A side ending in `@bf16` trains in mixed
precision: `fastnet train --precision bf16` for fastnet's backends (skipped where fastnet refuses
it), torch.autocast's bfloat16 for torch; e.g. --sides numba,numba@bf16,torch@bf16. A side
`NAME:TxR` trains data-parallel on R ranks of T threads each (`mpirun -n R fastnet train
--distributed --threads T`, fastnet.distributed), e.g. numba:1x2 against numba on a 2-core machine;
its worker is started under mpirun, and rank 0's epoch is the one reported; `NAME:TxR+overlap` adds
`--overlap`. --mpirun-args passes options to mpirun, e.g. "--mca btl tcp,self" to send over TCP.

Every measurement runs in its own fresh process (fastnet.harness.measure): after a NumPy call
OpenBLAS's threads keep spinning for a while and slow whatever runs next in the same process, and
each library's thread pools, JIT caches and allocator state would otherwise leak from one side into
the next. Repeats are interleaved (A B C A B C ...) so that drift on a shared, noisy machine hits
every side alike; the table shows the median epoch and the min-max spread. The sgemm peak that
"% peak" refers to is measured the same way, in its own processes, in the same run: the larger of
NumPy's and PyTorch's at 1024 to 4096. Other processes on the machine are the biggest source of
noise (OpenBLAS's two spinning threads slow down many times over when a third process takes a
core), so before each worker the script waits for an idle second (--quiet-wait), and it reports the
most cores others kept busy during one of a side's runs ("others" column), flagging disturbed runs.
Without CIFAR-10 (--data, or data/) the workers train on random uint8 images, and say so.
--neighbours 0,1 runs every side quiet and beside one busy one-core process (fastnet.cpu.busy_neighbours),
interleaved, and compares each side beside it with the quiet one-core numba: what a user with other
work on the machine gets.
"""

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The workers, in processes of their own, import the same fastnet (a checkout need not install it).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# After the path is set (fastnet needs no extra setup):
from fastnet import harness  # noqa: E402
from fastnet.cpu import DISTURBED, cpu_model  # noqa: E402
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
WARMUP_STEPS = 20  # before a whole epoch: more than fastnet bench's 10, as the timed part is longer
PEAK_SIZES = (1024, 2048, 3072, 4096)  # thorough: fastnet bench's two sizes, and the two largest


# --- Plan, run the workers interleaved, report -----------------------------------------------------

def measure_epoch(side, workload, source, quiet_wait, mpirun_args, neighbours):
    """One epoch of `workload` on `side`, in fastnet.harness's fresh process."""
    sizes, batch = WORKLOADS[workload].sizes, WORKLOADS[workload].batch_size
    spec = {"side": side, "sizes": sizes, "batch": batch, "steps": None, "warmup_steps": WARMUP_STEPS,
            "data": source}
    return harness.measure(spec, quiet_wait, neighbours, mpirun_args) | {"side": side, "workload": workload}


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
    print(f"thread settings: torch.set_num_threads({os.cpu_count()}) unless a side says :N; fastnet sides as listed "
          "below")
    workers = [(f"{s} worker", next((m for m in results if m["side"] == s and "threadpools" in m), None))
               for s in sides]
    for key, r in workers + [(f"{lib} sgemm peak worker", p) for lib, p in peaks.items()]:
        if r and "threadpools" in r:
            pools = harness.describe_pools(r["threadpools"], blas_only=False)
            extra = ""
            if "torch_threads" in r:
                extra = (f"; torch threads {r['torch_threads_default']} by default, {r['torch_threads']} set, "
                         f"interop {r['torch_interop_threads']}, MKL {r['torch_mkl']}, oneDNN {r['torch_mkldnn']}")
            if "parallelism" in r:
                p = r["parallelism"]
                extra = f"; {p['threads']} threads: {p['split']}" + (f", BLAS {p['blas']}" if "blas" in p else "")
                if "bf16" in key and "bf16_gemm" in p:
                    extra += f", bf16 GEMM {p['bf16_gemm']}"
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
    speed, percent_of_peak = {}, {}
    for side in sides:
        if side in skipped:
            print(f"{side:<12}skipped: {skipped[side]}")
            continue
        these = [r for r in results if r["side"] == side and r["workload"] == workload]
        runs, errors = [r for r in these if "error" not in r], [r["error"] for r in these if "error" in r]
        if errors:
            print(f"{side:<12}FAILED {len(errors)} of {repeats}: {errors[0]}")
        if not runs:
            continue
        s = harness.summarize(runs, sizes, peak)
        speed[side], percent_of_peak[side] = s["samples_per_second"], s["percent_of_peak"]
        epoch = f"{s['seconds']:.2f} ({s['seconds_runs'][0]:.2f}-{s['seconds_runs'][-1]:.2f})"
        percent = f"{s['percent_of_peak']:.1f}" if peak else "n/a"
        print(f"{side:<12}{speed[side]:>11,.0f}{s['ms_per_step']:>9.2f}{s['gflops']:>9.1f}{percent:>8}{epoch:>24}"
              f"{s['warmup_seconds']:>11.2f}"
              f"{s['final_loss']:>12.3f}{s['cpu_per_wall']:>9.2f}{s['other_load']:>8.2f}{s['neighbour_load']:>11.2f}")
        if "step_over_products" in s:
            over, goal = s["step_over_products"], PRODUCTS_GOAL.get(workload, (None, None))
            verdict = (f" (goal <= {goal[1]:.1f}x: {'met' if over <= goal[1] else 'NOT met'})"
                       if goal[0] == side and not neighbours else "")
            print(f"       {side}: the epoch took {over:.2f}x its products alone (same shapes and tiles){verdict}")
        if not s["finite_loss"]:
            print(f"       WARNING: {side} ended an epoch with a non-finite loss")
        if s["disturbed_runs"]:
            print(f"       WARNING: other processes kept > {DISTURBED} cores busy during {s['disturbed_runs']} of "
                  f"{len(runs)} {side} runs")
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
        percent = percent_of_peak[side]
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
    args = parser.parse_args()
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS] + [s for s in sides if harness.parse_side(s) is None]
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
    reasons = {s: harness.skip_reason(s) for s in {*sides, "torch"}}
    skipped = {s: reasons[s] for s in sides if reasons[s]}
    synthetic = f"SYNTHETIC random uint8 images ({harness.SYNTHETIC_IMAGES:,} x 3072) and labels: no CIFAR-10 found"
    print(f"data: {synthetic if source == 'synthetic' else source}")
    print(f"recipe: float32, SGD momentum {MOMENTUM}, constant lr {harness.LR}, no weight decay, "
          f"{WARMUP_STEPS} untimed warm-up steps, then one timed epoch")
    if any(neighbour_counts):
        print(f"neighbours: each side runs beside {' and '.join(map(str, neighbour_counts))} busy one-core "
              f"process(es) (`while True: pass`), started after the quiet wait; 'neighbours' gives the cores they got")

    peaks = {lib: harness.measure({"side": "peak", "lib": lib, "sizes": PEAK_SIZES}, args.quiet_wait)
             for lib in ("numpy", "torch") if not reasons.get(lib)}
    for lib, p in peaks.items():
        if "error" in p:
            print(f"sgemm peak {lib}: {p['error']}")
        else:
            sizes = ", ".join(f"{n}: {g:.0f}" for n, g in p["by_size"].items())
            arch = harness.describe_pools(p["threadpools"])
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
                    res = measure_epoch(side, workload, source, args.quiet_wait, args.mpirun_args.split(), neighbours)
                    res |= {"repeat": r + 1, "neighbours": neighbours}
                    results.append(res)
                    shown = f"{res['seconds']:.2f} s" if "seconds" in res else res["error"]
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
    print("cpu/wall: CPU seconds of the worker per second of its epoch (2.0 = both cores); others: the most cores "
          "that OTHER processes on the machine kept busy during one of the side's workers (should be ~0 for clean "
          "numbers); neighbours: cores that --neighbours' processes got")
    print(f"\ntotal wall time of the workers: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": source, "skipped": skipped, "peaks": peaks, "reference_peak": ref,
                       "measurements": results}, f, indent=1)
        print(f"raw measurements written to {args.json}")


if __name__ == "__main__":
    main()
