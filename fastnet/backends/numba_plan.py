"""The numba backend's plan for this machine: which BLAS its tiles call and how finely its products
are cut, measured on the machine it runs on and kept (as FFTW keeps its wisdom).

What was tuned on one CPU is a guess on the next: on an Intel Xeon (Emerald Rapids) MKL's one-thread
sgemm ran R1's products faster than OpenBLAS's, and on an AMD EPYC (Zen 3) OpenBLAS's were the
faster (benchmarks/RESULTS.md). `fastnet plan --measure` times training steps of the two fixed workloads (R1 and R2, on
synthetic data) for every BLAS fastnet can drive here, each in a process of its own, at a few tile
sizes, interleaved, quiet and beside a busy process (fine tiles cost a little on a quiet machine and
pay beside other work), and keeps the fastest over both in plan.json under fastnet's cache folder
($FASTNET_PLAN_FILE overrides the path), with the fingerprint of the machine it was measured on. A
plan whose fingerprint does not match this machine is ignored. `fastnet plan` shows the plan in force.

A plan changes speed, not results, but for the BLAS it names: a tile is a block of the output whose
every element one BLAS call sums whole, however finely the product is cut. OPENBLAS_CORETYPE is never
set: OpenBLAS's kernel type is whatever the user or the machine chose.
"""

import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from fastnet import cpu
from fastnet.backends import numba_blas

TILE_FLOPS = (1 << 23, 1 << 25, 1 << 27, 1 << 40)  # 8, 32 and 128 MFLOP a tile; 1 << 40: a tile per core
STEPS = {"R1": 100, "R2": 250}  # about half a second of each on a 2-core machine
REPEATS = 2
NEIGHBOURS = (0, 1)  # quiet, and beside one busy process


def plan_file():
    """$FASTNET_PLAN_FILE, else plan.json in fastnet's cache folder (fastnet.data.folders.cache_folder)."""
    if os.environ.get("FASTNET_PLAN_FILE"):
        return Path(os.environ["FASTNET_PLAN_FILE"])
    from fastnet.data.folders import cache_folder

    return cache_folder() / "plan.json"


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint():
    """What a plan depends on: the CPU, its vector instructions, its cores, and the libraries timed."""
    vector = sorted(flag for flag, _ in cpu.VECTOR_FLAGS if flag in cpu.flags())
    return {"cpu": cpu.model_name(), "vector": vector, "cores": os.cpu_count(),
            **{package: _version(package) for package in ("numpy", "numba", "mkl")}}


def load():
    """The plan measured on this machine, or None: none kept, another machine's, or unreadable."""
    try:
        saved = json.loads(plan_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint():
        return None
    return saved


def status():
    """One line on where the plan in force comes from."""
    path, saved = plan_file(), load()
    if saved is not None:
        return f"measured on {saved['measured']} ({path})"
    if path.exists():
        return f"defaults: {path} is another machine's plan or unreadable, so it is ignored (fastnet plan --measure)"
    return "defaults: not measured on this machine (fastnet plan --measure)"


def _blases():
    return ["openblas"] + (["mkl"] if numba_blas._mkl_path() else [])


def measure(log=print, steps=None, repeats=REPEATS):
    """Time every BLAS at every tile size, keep the fastest as this machine's plan and return it."""
    steps = steps or STEPS
    blases = _blases()
    timings = {}  # (blas, tile_flops, workload, neighbours) -> seconds per step, each repeat
    for repeat in range(repeats):
        for neighbours in NEIGHBOURS:
            for blas in blases:
                log(f"plan: timing {blas} at {len(TILE_FLOPS)} tile sizes beside {neighbours} busy processes, "
                    f"repeat {repeat + 1} of {repeats}")
                environment = os.environ | {"FASTNET_BLAS": blas}
                environment.pop("FASTNET_PLAN", None)
                with cpu.busy_neighbours(neighbours):
                    done = subprocess.run([sys.executable, "-m", "fastnet.backends.numba_plan", json.dumps(steps)],
                                          capture_output=True, text=True, env=environment)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"timing {blas} failed: {tail}")
                for row in json.loads(done.stdout.strip().splitlines()[-1]):
                    key = blas, row["tile_flops"], row["workload"], neighbours
                    timings.setdefault(key, []).append(row["seconds"])
    seconds = {key: statistics.median(runs) for key, runs in timings.items()}
    conditions = [(w, n) for w in steps for n in NEIGHBOURS]
    best = {(w, n): min(s for (_, _, *condition), s in seconds.items() if tuple(condition) == (w, n))
            for w, n in conditions}

    def cost(blas, tile_flops):  # each step time against the fastest in its condition, added up
        return sum(seconds[(blas, tile_flops, *condition)] / best[condition] for condition in conditions)

    blas, tile_flops = min(((b, t) for b in blases for t in TILE_FLOPS), key=lambda bt: cost(*bt))
    plan = {"fingerprint": fingerprint(), "measured": datetime.date.today().isoformat(), "blas": blas,
            "entries": {"tile_flops": tile_flops, "tile_multiple": os.cpu_count() or 1},
            "timings": [{"blas": b, "tile_flops": t, "workload": w, "neighbours": n, "seconds_per_step": s,
                         "cost": cost(b, t)} for (b, t, w, n), s in sorted(seconds.items())]}
    path = plan_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(plan, indent=1))
    os.replace(temporary, path)  # never a half-written plan
    return plan


def format_plan(plan):
    lines = [f"plan: {status()}", f"  CPU: {cpu.cpu_model()}, {os.cpu_count()} cores"]
    if plan is None:
        from fastnet.backends import numba_gemm
        chooser = "$FASTNET_BLAS" if os.environ.get("FASTNET_BLAS") else "the CPU's vendor"
        lines.append(f"  BLAS: {numba_gemm.BLAS.describe()} (chosen by {chooser}); entries: {numba_gemm.plan()}")
        return "\n".join(lines)
    lines.append(f"  BLAS: {plan['blas']}; entries: {plan['entries']}")
    lines.append(f"  {'blas':<10}{'tile MFLOP':>12}{'workload':>10}{'ms/step quiet':>15}{'beside 1 busy':>15}"
                 f"{'cost':>7}")
    rows = {(r["blas"], r["tile_flops"], r["workload"], r["neighbours"]): r for r in plan["timings"]}
    for (blas, tile_flops, workload, neighbours), row in rows.items():
        if neighbours:
            continue
        tile = "per core" if tile_flops >= 1 << 40 else f"{tile_flops / 2 ** 20:.0f}"
        busy = rows.get((blas, tile_flops, workload, 1))
        busy = f"{busy['seconds_per_step'] * 1e3:.2f}" if busy else "n/a"
        lines.append(f"  {blas:<10}{tile:>12}{workload:>10}{row['seconds_per_step'] * 1e3:>15.2f}{busy:>15}"
                     f"{row['cost']:>7.2f}")
    lines.append("  cost: the step times, quiet and beside a busy process, each against the fastest measured in its "
                 "condition, added up; the lowest is kept")
    return "\n".join(lines)


def _time_tile_sizes(steps):
    """In a process whose BLAS is $FASTNET_BLAS: seconds per step of each workload at each tile size,
    the sizes interleaved, the best of two rounds."""
    from fastnet.backends import numba_gemm
    from fastnet.harness import time_fastnet
    from fastnet.workloads import WORKLOADS
    rows = []
    for workload, count in steps.items():
        sizes, batch = WORKLOADS[workload].sizes, WORKLOADS[workload].batch_size
        best = {}
        for _ in range(2):
            for tile_flops in TILE_FLOPS:
                numba_gemm.set_plan(tile_flops=tile_flops)
                seconds = time_fastnet("numba", sizes, batch, count)["seconds"] / count
                best[tile_flops] = min(best.get(tile_flops, seconds), seconds)
        rows += [{"workload": workload, "tile_flops": t, "seconds": s} for t, s in best.items()]
    return rows


if __name__ == "__main__":
    print(json.dumps(_time_tile_sizes(json.loads(sys.argv[1]))))
