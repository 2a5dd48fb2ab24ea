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

Where the CPU multiplies bfloat16, bf16 steps are timed the same way for every bf16 GEMM installed
(MKL's, oneDNN's) beside the fastest BLAS: which library MKL's dispatch or oneDNN's makes the faster
is a fact of the CPU (MKL uses no bf16 instructions on a CPU not Intel's), and the plan keeps how
bf16 steps compared with float32's, by which fastnet refuses a --precision bf16 that would be slower.

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

from fastnet import cpu, storage
from fastnet.backends import numba_blas
from fastnet.errors import FastnetError

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
            **{package: _version(package) for package in ("numpy", "numba", "mkl", "onednn")}}


def _saved():
    """What the plan file holds, if it is a JSON object with a fingerprint; else None."""
    try:
        saved = json.loads(plan_file().read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("fingerprint"), dict) else None


def load():
    """The plan measured on this machine, or None: none kept, another machine's, or unreadable."""
    saved = _saved()
    return saved if saved is not None and saved["fingerprint"] == fingerprint() else None


def status():
    """One line on where the plan in force comes from; for a plan that is ignored, what changed."""
    path, saved = plan_file(), _saved()
    if saved is not None and saved["fingerprint"] == fingerprint():
        return f"measured on {saved['measured']} ({path})"
    if saved is not None:
        now = fingerprint()
        then = saved["fingerprint"]
        changes = ", ".join(f"{name} {_shown(then, name)} (now {_shown(now, name)})"
                            for name in sorted({*then, *now}) if then.get(name, then) != now.get(name, now))
        return f"defaults: {path} was measured with {changes}, so it is ignored (fastnet plan --measure)"
    if path.exists():
        return f"defaults: {path} is unreadable, so it is ignored (fastnet plan --measure)"
    return "defaults: not measured on this machine (fastnet plan --measure)"


def _shown(fingerprint, name):
    """A fingerprint's entry in words; a plan from an older fastnet may not record every entry."""
    if name not in fingerprint:
        return "unrecorded"
    value = fingerprint[name]
    return "not installed" if value is None else (", ".join(value) if isinstance(value, list) else str(value))


def _blases():
    return ["openblas"] + (["mkl"] if numba_blas._mkl_path() else [])


def _bf16_gemms():
    """The bfloat16 GEMM libraries installed here, where the CPU multiplies bfloat16 at all."""
    from fastnet.precision import bf16_instructions
    if not bf16_instructions():
        return []
    return [name for name, path in (("mkl", numba_blas._mkl_path()), ("onednn", numba_blas._onednn_path())) if path]


def measure(log=print, steps=None, repeats=REPEATS):
    """Time every BLAS at every tile size in float32, then every bfloat16 GEMM at every tile size beside
    the fastest BLAS; keep the fastest of each as this machine's plan, with how much faster (or
    slower) bf16 steps ran than float32's, and return it."""
    steps = steps or STEPS
    path = plan_file()
    _writable(path)  # before minutes of timing, not after
    fp32 = _time_candidates("fp32", {blas: {"FASTNET_BLAS": blas} for blas in _blases()}, steps, repeats, log)
    blas, tile_flops = _fastest(fp32)
    plan = {"fingerprint": fingerprint(), "measured": datetime.date.today().isoformat(), "blas": blas,
            "entries": {"tile_flops": tile_flops, "tile_multiple": os.cpu_count() or 1}, "timings": fp32}
    gemms = _bf16_gemms()
    if gemms:
        bf16 = _time_candidates("bf16", {gemm: {"FASTNET_BLAS": blas, "FASTNET_BF16_GEMM": gemm} for gemm in gemms},
                                steps, repeats, log)
        gemm, plan["entries"]["bf16_tile_flops"] = _fastest(bf16)
        plan["bf16_gemm"] = gemm
        plan["bf16_speedup"] = {workload: _quiet_seconds(fp32, blas, tile_flops, workload)
                                / _quiet_seconds(bf16, gemm, plan["entries"]["bf16_tile_flops"], workload)
                                for workload in steps}
        plan["timings"] = fp32 + bf16
    try:
        storage.write_text_atomically(path, json.dumps(plan, indent=1))  # never a half-written plan
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    return plan


def _writable(path):
    """Make the plan file's folder, and check that a file can be written there, or raise why not."""
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise storage.refused(path, exc) or _unwritable(path, exc) from exc


def _unwritable(path, exc):
    return FastnetError(f"cannot write the plan to {path} ({exc.strerror}): set FASTNET_PLAN_FILE to a file in a "
                        f"writable folder, or FASTNET_CACHE to a writable folder")


def _time_candidates(precision, candidates, steps, repeats, log):
    """Rows of seconds per step for each candidate library (its environment in `candidates`) at each
    tile size, on each workload, quiet and beside a busy process, each library in processes of its
    own, interleaved; each row's cost is the library and tile size's over all conditions."""
    timings = {}  # (library, tile_flops, workload, neighbours) -> seconds per step, each repeat
    for repeat in range(repeats):
        for neighbours in NEIGHBOURS:
            for library, variables in candidates.items():
                log(f"plan: timing {precision} steps on {library} at {len(TILE_FLOPS)} tile sizes beside {neighbours} "
                    f"busy processes, repeat {repeat + 1} of {repeats}")
                environment = {k: v for k, v in os.environ.items() if k not in ("FASTNET_PLAN", "FASTNET_BF16_GEMM")}
                with cpu.busy_neighbours(neighbours):
                    done = subprocess.run([sys.executable, "-m", "fastnet.backends.numba_plan", json.dumps(steps),
                                           precision], capture_output=True, text=True, env=environment | variables)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"timing {precision} on {library} failed: {tail}")
                for row in json.loads(done.stdout.strip().splitlines()[-1]):
                    key = library, row["tile_flops"], row["workload"], neighbours
                    timings.setdefault(key, []).append(row["seconds"])
    seconds = {key: statistics.median(runs) for key, runs in timings.items()}
    conditions = [(w, n) for w in steps for n in NEIGHBOURS]
    best = {(w, n): min(s for (_, _, *condition), s in seconds.items() if tuple(condition) == (w, n))
            for w, n in conditions}

    def cost(library, tile_flops):  # each step time against the fastest in its condition, added up
        return sum(seconds[(library, tile_flops, *condition)] / best[condition] for condition in conditions)

    return [{"precision": precision, "library": library, "tile_flops": t, "workload": w, "neighbours": n,
             "seconds_per_step": s, "cost": cost(library, t)} for (library, t, w, n), s in sorted(seconds.items())]


def _fastest(rows):
    """(library, tile_flops) of the lowest cost among the rows."""
    row = min(rows, key=lambda row: row["cost"])
    return row["library"], row["tile_flops"]


def _quiet_seconds(rows, library, tile_flops, workload):
    return next(row["seconds_per_step"] for row in rows if (row["library"], row["tile_flops"], row["workload"],
                                                            row["neighbours"]) == (library, tile_flops, workload, 0))


def format_plan(plan):
    lines = [f"plan: {status()}", f"  CPU: {cpu.cpu_model()}, {os.cpu_count()} cores"]
    if plan is None:
        from fastnet.backends import numba_gemm
        chooser = "$FASTNET_BLAS" if os.environ.get("FASTNET_BLAS") else "the CPU's vendor"
        lines.append(f"  BLAS: {numba_gemm.BLAS.describe()} (chosen by {chooser}); entries: {numba_gemm.plan()}")
        return "\n".join(lines)
    lines.append(f"  BLAS: {plan['blas']}; entries: {plan['entries']}")
    if plan.get("bf16_gemm"):
        speedup = ", ".join(f"{w} {x:.2f}x" for w, x in plan["bf16_speedup"].items())
        lines.append(f"  bf16 GEMM: {plan['bf16_gemm']}; bf16 steps against float32's: {speedup}")
    lines.append(f"  {'precision':<10}{'library':<10}{'tile MFLOP':>12}{'workload':>10}{'ms/step quiet':>15}"
                 f"{'beside 1 busy':>15}{'cost':>7}")
    rows = {(r["precision"], r["library"], r["tile_flops"], r["workload"], r["neighbours"]): r for r in plan["timings"]}
    for (precision, library, tile_flops, workload, neighbours), row in rows.items():
        if neighbours:
            continue
        tile = "per core" if tile_flops >= 1 << 40 else f"{tile_flops / 2 ** 20:.0f}"
        busy = rows.get((precision, library, tile_flops, workload, 1))
        busy = f"{busy['seconds_per_step'] * 1e3:.2f}" if busy else "n/a"
        lines.append(f"  {precision:<10}{library:<10}{tile:>12}{workload:>10}{row['seconds_per_step'] * 1e3:>15.2f}"
                     f"{busy:>15}{row['cost']:>7.2f}")
    lines.append("  cost: the step times, quiet and beside a busy process, each against the fastest measured in its "
                 "condition, added up; the lowest of each precision is kept")
    return "\n".join(lines)


def _time_tile_sizes(steps, precision):
    """In a process whose libraries $FASTNET_BLAS and $FASTNET_BF16_GEMM name: seconds per step of each
    workload in `precision` at each tile size, the sizes interleaved, the best of two rounds."""
    from fastnet.backends import numba_gemm
    from fastnet.harness import time_fastnet
    from fastnet.workloads import WORKLOADS
    entry = "bf16_tile_flops" if precision == "bf16" else "tile_flops"
    rows = []
    for workload, count in steps.items():
        sizes, batch = WORKLOADS[workload].sizes, WORKLOADS[workload].batch_size
        best = {}
        for _ in range(2):
            for tile_flops in TILE_FLOPS:
                numba_gemm.set_plan(**{entry: tile_flops})
                seconds = time_fastnet("numba", sizes, batch, count, precision=precision)["seconds"] / count
                best[tile_flops] = min(best.get(tile_flops, seconds), seconds)
        rows += [{"workload": workload, "tile_flops": t, "seconds": s} for t, s in best.items()]
    return rows


if __name__ == "__main__":
    print(json.dumps(_time_tile_sizes(json.loads(sys.argv[1]), sys.argv[2])))
