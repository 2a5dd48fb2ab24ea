"""fastnet.harness, the one timing harness of `fastnet bench` and tools/compare_workloads.py: its sides,
its workers in processes of their own, the figures it reads from their runs, and the report the
compare_workloads driver prints from them. Nothing here asserts a speed: only what is measured, and
that the arithmetic on it holds."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastnet import harness
from fastnet.harness import Side, parse_side
from fastnet.workloads import R1, flops_per_sample
from helpers import save_brightness_classes

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "tools" / "compare_workloads.py"


@pytest.mark.parametrize("text, side", [
    ("numba", Side("numba", None)),
    ("numpy:1", Side("numpy", 1)),
    ("torch:4@bf16", Side("torch", 4, precision="bf16")),
    ("numba:1x2", Side("numba", 1, ranks=2)),
    ("numba:1x2+overlap@bf16", Side("numba", 1, 2, True, "bf16")),
    ("cuda", None),  # not a backend fastnet has
    ("numba:0", None),
    ("numba@fp16", None),
    ("torch:1x2", None),  # PyTorch is timed in one process
    ("numba+overlap", None),  # overlap needs ranks to overlap with
    ("numba:1x1+overlap", None),
    ("numba:1x2+later", None),
])
def test_sides_parse_as_the_harness_runs_them(text, side):
    assert parse_side(text) == side


def run(seconds, samples=1000, steps=10, other_load=0.0, products_seconds=None, final_loss=2.0):
    return {"seconds": seconds, "samples": samples, "steps": steps, "warmup_seconds": 1.0, "cpu_seconds": 2 * seconds,
            "final_loss": final_loss, "other_load": other_load, "neighbour_load": 0.25, "precision": "fp32",
            "products_seconds": products_seconds}


def test_summarize_takes_the_median_run_and_keeps_the_spread():
    sizes = [3072, 8, 10]
    runs = [run(2.0, products_seconds=1.0), run(1.0, other_load=0.5, products_seconds=0.5),
            run(4.0, final_loss=math.nan, products_seconds=1.0)]
    s = harness.summarize(runs, sizes, peak_gflops=10.0)
    assert s["seconds"] == 2.0 and s["seconds_runs"] == [1.0, 2.0, 4.0]
    assert s["samples_per_second"] == 500 and s["samples_per_second_runs"] == [250, 500, 1000]
    assert s["ms_per_step"] == 200 and s["cpu_per_wall"] == 2.0 and s["warmup_seconds"] == 1.0
    assert s["gflops"] == pytest.approx(flops_per_sample(sizes) * 500 / 1e9)
    assert s["percent_of_peak"] == pytest.approx(10 * s["gflops"])
    assert s["other_load"] == 0.5 and s["disturbed_runs"] == 1 and s["neighbour_load"] == 0.25
    assert s["step_over_products"] == 2.0 and s["finite_loss"] is False
    # A run without its products' time (PyTorch, bf16, data-parallel) leaves the ratio out.
    assert "step_over_products" not in harness.summarize([run(1.0, products_seconds=0.5), run(1.0)], sizes)
    assert harness.summarize([run(1.0)], sizes)["percent_of_peak"] is None


def test_synthetic_steps_have_the_rows_they_need_and_no_more():
    rows = harness.feed([3072, 8, 10], 4, steps=3, warmup_steps=10)
    assert rows.images.shape == (40, 3072) and rows.images.dtype == np.uint8
    assert len(rows.order) == 12 and len(rows.warm_order) == 40
    assert set(rows.order) <= set(range(40)) and rows.labels.max() < 10
    assert rows.shift.dtype == rows.scale.dtype == np.float32
    assert rows.described.startswith("SYNTHETIC")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """200 CIFAR-shaped training images: an epoch of 7 batches of 32."""
    return save_brightness_classes(tmp_path_factory.mktemp("tiny-cifar"), np.random.default_rng(0),
                                   {"train": 200, "test": 20}, side=32, step=60, base=40, noise=20)


@pytest.mark.parametrize("side", ["numpy:1", "torch"])
def test_a_side_trains_a_whole_epoch_of_a_dataset_in_a_process_of_its_own(side, tiny_dataset):
    reason = harness.skip_reason(side)
    if reason is not None:  # PyTorch is a peer, not a dependency: where it is missing, the harness says why
        assert side == "torch" and reason.startswith(("torch is not installed", "import torch failed"))
        return
    result = harness.measure({"side": side, "sizes": [3072, 8, 10], "batch": 32, "steps": None, "warmup_steps": 2,
                              "data": str(tiny_dataset)})
    assert "error" not in result, result
    assert result["side"] == side and result["samples"] == 200 and result["steps"] == 7
    assert str(tiny_dataset) in result["data"] and math.isfinite(result["final_loss"])
    assert result["seconds"] > 0 and result["warmup_seconds"] > 0 and result["cpu_seconds"] > 0
    assert result["other_load"] >= 0 and result["neighbour_load"] == 0  # no neighbours were asked for
    assert result["threadpools"] and result["os_threads"] >= 1
    if side == "torch":
        assert result["torch_threads"] == os.cpu_count() and "parallelism" not in result  # every core
    else:  # one thread, as the side says, and the step's products timed alone after it
        assert result["parallelism"]["threads"] == 1 and result["products_seconds"] > 0


def test_the_sgemm_peak_is_the_best_of_the_sizes_it_tries():
    peak = harness.measure({"side": "peak", "lib": "numpy", "sizes": [64, 128]})
    assert set(peak["by_size"]) == {"64", "128"}  # JSON's keys
    assert peak["gflops"] == max(peak["by_size"].values()) and peak["by_size"][str(peak["size"])] == peak["gflops"]
    assert peak["lib"] == "numpy" and peak["blas"]


def test_a_measurement_that_fails_says_why_in_one_line(tmp_path):
    result = harness.measure({"side": "numpy", "sizes": [3072, 8, 10], "batch": 4, "steps": 2, "warmup_steps": 1,
                              "data": str(tmp_path / "missing")})
    assert result["error"].startswith("the numpy measurement exited 1: ") and "\n" not in result["error"]
    assert "missing" in result["error"] and result["other_load"] >= 0


@pytest.mark.parametrize("side", ["sklearn", "sklearn+scaler", "fastnet:numpy"])
def test_a_scikit_learn_classifiers_fit_is_timed_and_scored(side, tmp_path):
    pytest.importorskip("sklearn")
    save_brightness_classes(tmp_path, np.random.default_rng(0), {"train": 300, "test": 90}, side=4, step=80,
                            base=40, noise=20)
    result = harness.measure({"side": side, "sizes": [48, 8, 3], "batch": 20, "epochs": 3, "train_size": 240,
                              "data": str(tmp_path)})
    assert "error" not in result, result
    assert result["samples"] == 720 and result["steps"] == 36 and result["epochs"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["seconds"] > 0 and math.isfinite(result["final_loss"])
    if side != "sklearn":  # on standardised pixels both learn the brightness classes (raw, SGD at lr 0.01 is slow)
        assert result["test_accuracy"] > 0.5
    if side.startswith("fastnet"):  # its run times the epochs alone, inside the fit
        assert 0 < result["epochs_seconds"] < result["seconds"]
    else:
        assert result["epochs_seconds"] is None


def test_compare_sklearn_reports_the_ratios_against_scikit_learn(capsys):
    spec = importlib.util.spec_from_file_location("compare_sklearn", ROOT / "tools" / "compare_sklearn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pools = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3", "architecture": "SkylakeX",
              "num_threads": 2}, {"user_api": "openmp", "internal_api": "openmp", "version": None, "num_threads": 2}]

    def fit(side, seconds, accuracy, inside=None):
        return run(seconds, samples=20_000, steps=100) | {"side": side, "test_accuracy": accuracy,
                                                          "threadpools": pools, "epochs_seconds": inside}

    results = [fit("sklearn", 4.0, 0.40), fit("sklearn", 5.0, 0.40), fit("fastnet:numba", 1.0, 0.395, 0.9),
               fit("fastnet:numba", 1.0, 0.395, 0.9), fit("fastnet:numpy", 3.0, 0.30, 2.7),
               {"side": "fastnet:numpy", "error": "the fastnet:numpy measurement exited 1: boom"}]
    args = type("Args", (), {"train_size": 10_000, "epochs": 2, "batch": 200, "repeats": 2})
    module.report(["sklearn", "fastnet:numba", "fastnet:numpy"], results, [3072, 128, 10], args)
    out = capsys.readouterr().out
    assert "fastnet:numba / sklearn: 4.50x the samples/s, test accuracy -0.50 points (goal >= 4.0x at the " \
           "accuracy within 1 point: met)" in out
    assert "fastnet:numpy / sklearn: 1.50x the samples/s, test accuracy -10.00 points" in out and "NOT met" in out
    assert "FAILED 1 of 2: the fastnet:numpy measurement exited 1: boom" in out
    assert "the epochs took 90% of the fit" in out
    assert out.count("  openblas 0.3 SkylakeX (2 threads)\n") == 3  # beside each side's row: the BLAS, not OpenMP


# --- tools/compare_workloads.py, the driver -------------------------------------------------------

@pytest.fixture
def compare(monkeypatch):
    """tools/compare_workloads.py as a module; what it sets for its workers (sys.path, PYTHONPATH) is
    undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    spec = importlib.util.spec_from_file_location("compare_workloads", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_workloads_refuses_a_side_it_cannot_parse():
    done = subprocess.run([sys.executable, str(COMPARE), "--sides", "numba,cuda"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown workloads/sides ['cuda']" in done.stderr


def test_compare_workloads_reports_each_side_against_the_goals(compare, capsys):
    samples, steps = 50_000, 391
    measured = {"numba": [run(10.0, samples, steps, products_seconds=9.0),
                          run(12.0, samples, steps, other_load=0.5, products_seconds=9.0)],
                "torch": [run(20.0, samples, steps), run(20.0, samples, steps)]}
    results = [r | {"side": side, "workload": "R1"} for side, runs in measured.items() for r in runs]
    results.append({"error": "the numba measurement exited 1: boom", "side": "numba", "workload": "R1"})
    speed = compare.report("R1", ["numba", "torch", "numpy@bf16"], results, {"numpy@bf16": "no bf16 here"},
                           peak=100.0, repeats=3)
    shown = capsys.readouterr().out
    assert speed == {"numba": pytest.approx(samples / 11.0), "torch": pytest.approx(samples / 20.0)}
    assert "numba       FAILED 1 of 3: the numba measurement exited 1: boom" in shown
    assert "numpy@bf16  skipped: no bf16 here" in shown
    assert "numba/torch 1.82 (goal >= 1.5x: met)" in shown
    assert "numba: the epoch took 1.22x its products alone (same shapes and tiles) (goal <= 1.1x: NOT met)" in shown
    assert "WARNING: other processes kept > 0.1 cores busy during 1 of 2 numba runs" in shown
    percent = 100 * R1.flops_per_sample * samples / 11.0 / 1e9 / 100.0
    assert f"numba at {percent:.1f} % of the sgemm peak (goal >= 70 %: NOT met)" in shown
    numba_row = next(line for line in shown.splitlines() if line.startswith("numba ") and "FAILED" not in line)
    assert "11.00 (10.00-12.00)" in numba_row and numba_row.split()[-2:] == ["0.50", "0.25"]  # others, neighbours
