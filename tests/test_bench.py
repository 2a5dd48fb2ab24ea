"""`fastnet bench`: its arithmetic, and its report from the real command on a tiny network."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from fastnet.workloads import R1, R2, WORKLOADS, flops_per_sample, named, product_flops
from helpers import assert_one_line_error, fastnet, unavailable


def test_flops_per_sample_counts_three_gemms_per_layer_but_the_first_layers_input_gradient():
    # R1: forward 2*(3072*512 + 512*512 + 512*10) = 3,680,256 FLOPs; backward twice that, less the
    # first layer's input gradient (2*3072*512 = 3,145,728).
    assert flops_per_sample([3072, 512, 512, 10]) == 3 * 3_680_256 - 3_145_728
    assert flops_per_sample([4, 3]) == 2 * 2 * 4 * 3
    assert R1.flops_per_sample == 3 * 3_680_256 - 3_145_728
    assert product_flops(2, 3, 4) == 2 * 2 * 3 * 4  # a multiply and an add per term of each output element


def test_the_fixed_workloads_are_r1_and_r2_and_named_by_their_shapes():
    assert {name: (w.sizes, w.batch_size) for name, w in WORKLOADS.items()} == {
        "R1": ((3072, 512, 512, 10), 128), "R2": ((3072, 128, 10), 64)}
    assert named([3072, 128, 10], 64) == "R2" and named([3072, 128, 10], 128) is None
    assert str(R2) == "R2: MLP 3072-128-10, batch 64"


def test_bench_reports_every_side_consistently():
    result = fastnet("bench", "--backend", "numpy,numba", "--hidden", 8, "--batch-size", 4, "--steps", 3,
                     "--repeats", 2, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sizes"] == [3072, 8, 10] and report["flops_per_sample"] == flops_per_sample([3072, 8, 10])
    assert report["workload"] is None  # --hidden and --batch-size replaced R1's
    expected_sides = {"numpy", "numba"} | ({"torch"} if importlib.util.find_spec("torch") else set())
    assert set(report["results"]) == expected_sides
    for side, r in report["results"].items():
        seconds = r["ms_per_step"] * 3 / 1e3
        assert r["samples_per_second"] == pytest.approx(4 * 3 / seconds)
        assert r["gflops"] == pytest.approx(report["flops_per_sample"] * r["samples_per_second"] / 1e9)
        assert r["percent_of_peak"] == pytest.approx(100 * r["gflops"] / report["sgemm_peak_gflops"])
        assert r["warmup_seconds"] > 0  # measured, not left at a default
        assert ("vs_torch" in r) == ("torch" in report["results"] and side != "torch")
        runs = r["samples_per_second_runs"]  # interleaved with the other sides'
        assert len(runs) == report["repeats"] == 2 and runs == sorted(runs)
        # The median of two runs' seconds is their mean: its rate lies between the two runs' rates.
        assert runs[0] <= r["samples_per_second"] * (1 + 1e-12) and r["samples_per_second"] <= runs[-1] * (1 + 1e-12)
        assert r["other_load"] >= 0 and 0 <= r["disturbed_runs"] <= 2
        # fastnet's sides are held against their products alone; PyTorch has no such yardstick.
        assert ("step_over_products" in r) == (side != "torch")
        assert r.get("step_over_products", 1) > 0


def test_bench_with_ranks_times_each_backend_data_parallel_too():
    """--ranks 2: each backend also under mpirun -n 2, one thread per rank on this 2-core machine, with
    the ranks recorded by the run itself (not inferred from the side's name)."""
    if shutil.which("mpirun") is None:
        unavailable("mpirun is not installed: apt-get install openmpi-bin (and pip install mpi4py)")
    threads = 2
    result = fastnet("bench", "--backend", "numpy,numba", "--hidden", 8, "--batch-size", 5, "--steps", 3,
                     "--repeats", 1, "--threads", threads, "--ranks", 2, "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    for backend in ("numpy", "numba"):
        alone, together = results[backend], results[f"{backend}:1x2"]
        assert "distributed" not in alone and alone["parallelism"]["threads"] == threads
        assert together["distributed"]["ranks"] == 2 and together["parallelism"]["threads"] == 1
        assert together["samples_per_second"] == pytest.approx(5 * 3 / (together["ms_per_step"] * 3 / 1e3))
        assert ("vs_torch" in together) == ("torch" in results)


def test_bench_times_the_workload_it_is_given():
    result = fastnet("bench", "--backend", "numpy", "--workload", "R2", "--steps", 1, "--repeats", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fastnet bench: R2 MLP 3072-128-10, batch 64, 1 timed steps")
    # (--hidden and --batch-size instead of a workload's: test_bench_reports_every_side_consistently)


def test_bench_help_names_the_workloads_and_no_python_tuple():
    shown = fastnet("bench", "--help").stdout
    assert "R1: MLP 3072-512-512-10, batch 128" in " ".join(shown.split()) and "(512, 512)" not in shown


def test_bench_table_names_each_backend():
    result = fastnet("bench", "--backend", "numpy", "--hidden", 8, "--batch-size", 4, "--steps", 2, "--repeats", 1)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[4:]]
    assert rows[0] == "numpy" and "sgemm peak" in result.stdout and "CPU: " in result.stdout


@pytest.mark.parametrize("args, phrase", [
    (["--backend", "numpy,cuda"], "unknown backend 'cuda'"),
    (["--steps", "0"], "--steps"),
    (["--backend", ","], "comma list of backend names"),
])
def test_bench_bad_input(args, phrase):
    assert_one_line_error(fastnet("bench", *args), phrase)


def test_bench_in_bf16_says_so_and_runs_every_side_in_it():
    result = fastnet("bench", "--backend", "numpy,numba", "--hidden", 8, "--batch-size", 4, "--steps", 2,
                     "--repeats", 1, "--precision", "bf16", env={"FASTNET_BF16_ANY_CPU": "1"})
    assert result.returncode == 0, result.stderr
    assert "bf16 mixed precision (PyTorch: torch.autocast bfloat16)" in result.stdout.splitlines()[0]
    from fastnet.backends import numba_gemm  # the library this process found, as the bench's processes do
    # The numba side's line names the library and the bf16 instructions it uses.
    assert f"; bf16 GEMM {numba_gemm.BF16_GEMM.describe()}" in result.stdout
    report = json.loads(fastnet("bench", "--backend", "numba", "--hidden", 8, "--batch-size", 4, "--steps", 2,
                                "--repeats", 1, "--precision", "bf16", "--json",
                                env={"FASTNET_BF16_ANY_CPU": "1"}).stdout)
    assert report["precision"] == "bf16" and isinstance(report["bf16_instructions"], list)
    assert {r["precision"] for r in report["results"].values()} == {"bf16"}


def test_a_run_that_other_load_disturbs_says_so(tmp_path):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # keeps about one core busy
    try:
        # BLAS on one thread: OpenBLAS's threads, spinning against the spinner, would make the sgemm
        # peak alone take half a minute, and what is tested is only that the load is noticed.
        result = fastnet("bench", "--backend", "numpy", "--hidden", 8, "--batch-size", 4, "--steps", 20,
                         "--repeats", 2, env={"OPENBLAS_NUM_THREADS": "1"})
    finally:
        spinner.kill()
        spinner.wait()
    assert result.returncode == 0, result.stderr
    assert "disturbed: other processes kept more than 0.1 cores busy during 2 of 2 numpy runs" in result.stdout
    numpy_row = next(line for line in result.stdout.splitlines() if line.startswith("numpy "))
    assert float(numpy_row.split()[-1]) > 0.1  # the "others" column: the most cores others kept busy in a run


def test_busy_neighbours_take_cpu_while_the_context_lasts_and_are_gone_after():
    """tools/compare_workloads.py --neighbours: each neighbour is a process that keeps a core busy."""
    import time

    from fastnet.cpu import busy_neighbours, process_seconds
    with busy_neighbours(2) as spinners:
        assert len(spinners) == 2 and all(p.poll() is None for p in spinners)
        before = [process_seconds(p.pid) for p in spinners]
        started = time.monotonic()
        # Each keeps a core busy: together they use at least a second of CPU time per second once they
        # have half a core each. A machine loaded by other work gives them less, so wait up to 20 s.
        while True:
            time.sleep(0.25)
            used = [process_seconds(p.pid) - b for p, b in zip(spinners, before, strict=True)]
            if sum(used) >= 1.0 or time.monotonic() - started > 20:
                break
    assert sum(used) >= 1.0 and all(u > 0 for u in used), used
    assert all(p.poll() is not None for p in spinners)
    assert process_seconds(spinners[0].pid) == 0.0  # reaped: nothing left to read
