"""`fastnet bench`: time training steps on synthetic data, per backend, against this machine's sgemm
peak and, when it is importable, PyTorch.

Every measurement (each backend, PyTorch, the sgemm peak) is one of fastnet.harness's: a fresh
process of its own, the cores other processes kept busy meanwhile recorded beside it. The sides run
several times, interleaved, and the report gives the median, the spread and how busy other
processes kept the CPU, flagging the runs they disturbed. The fastnet sides time
`fastnet.step.train_epoch`, the loop `fastnet train` runs:
gather and normalise uint8 rows, forward, loss, backward, SGD-momentum update.

With `--ranks N`, each backend is also timed data-parallel: N processes under `mpirun`, each on its
share of every batch with the cores shared among them (the side `BACKEND:TxN`, T threads per rank),
as `mpirun -n N fastnet train --distributed` runs. Rank 0's time is the one reported.
"""

import os

from fastnet import harness
from fastnet.cpu import DISTURBED, cpu_model
from fastnet.precision import bf16_instructions
from fastnet.workloads import flops_per_sample, named

INPUT_SIZE, CLASSES = 3072, 10  # CIFAR-10's shape, so the figures compare with real training
PRECISION_NAMES = {"fp32": "float32", "bf16": "bf16 mixed precision (PyTorch: torch.autocast bfloat16)"}


def data_parallel_side(backend, ranks, threads=None):
    """The side name of `backend` on `ranks` ranks: BACKEND:TxN, T the threads of each."""
    return f"{backend}:{max(1, (threads or os.cpu_count()) // ranks)}x{ranks}"


def measure_in_own_process(side, sizes, batch, steps, threads=None, precision="fp32"):
    """One measurement of `side` (a backend, BACKEND:TxN, torch or peak) on `threads` cores (None: all)
    in fastnet.harness's fresh process; RuntimeError when it fails."""
    if side == "peak":
        spec = {"side": "peak", "lib": "numpy", "sizes": harness.PEAK_SIZES}
    else:
        layout = "" if ":" in side or not threads else f":{threads}"  # BACKEND:TxN carries its own
        spec = {"side": side + layout + ("@bf16" if precision == "bf16" else ""), "sizes": sizes, "batch": batch,
                "steps": steps, "warmup_steps": harness.WARMUP_STEPS, "data": "synthetic"}
    result = harness.measure(spec)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def bench(backend_names, hidden, batch, steps, threads=None, precision="fp32", repeats=3, ranks=None):
    """Measure every side `repeats` times, each time in a process of its own, interleaved (A B C A B C
    ...) so that drift on a shared machine reaches every side alike, on `threads` cores (None: all),
    fastnet's and PyTorch's in `precision`; with `ranks`, each backend data-parallel on that many
    ranks too. Returns the report as a dict: per side fastnet.harness.summarize's figures of its runs."""
    sizes = [INPUT_SIZE, *hidden, CLASSES]
    parallel_sides = [data_parallel_side(b, ranks, threads) for b in backend_names] if ranks and ranks > 1 else []
    sides = list(backend_names) + parallel_sides + (["torch"] if harness.skip_reason("torch") is None else [])
    peak = measure_in_own_process("peak", sizes, batch, steps)
    runs = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            runs[side].append(measure_in_own_process(side, sizes, batch, steps, threads, precision))
    results = {side: harness.summarize(timings, sizes, peak["gflops"]) for side, timings in runs.items()}
    if "torch" in results:
        for side in [*backend_names, *parallel_sides]:
            results[side]["vs_torch"] = results[side]["samples_per_second"] / results["torch"]["samples_per_second"]
    return {"workload": named(sizes, batch), "sizes": sizes, "batch_size": batch, "steps": steps, "repeats": repeats,
            "threads": threads or os.cpu_count(), "cpu": cpu_model(), "flops_per_sample": flops_per_sample(sizes),
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

