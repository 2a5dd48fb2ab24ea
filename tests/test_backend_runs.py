"""Whole training runs on every backend but numpy: 200 steps against numpy's, bit-identical reruns
of a seed, the same bits on 1, 2 and 3 threads, and the command on the real CIFAR-10 against numpy's
accuracy."""

import json

import numpy as np
import pytest

from fastnet.config import TrainConfig
from fastnet.run_folder import TIMING_METRICS
from fastnet.train import train
from helpers import assert_close, fastnet, real_data_path, save_brightness_classes


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 3-class npy dataset of 4x4x3 uint8 images (48 inputs): each class a brightness level under
    enough noise that a small network gets most, not all, of them right. 632 training images make 40
    batches of 16 per epoch (the last one of 8, so a second workspace is used too)."""
    return save_brightness_classes(tmp_path_factory.mktemp("synthetic"), np.random.default_rng(1),
                                   {"train": 632, "test": 300}, side=4, step=30, base=100, noise=70)


SYNTHETIC_RUN = dict(hidden=(32, 16), epochs=5, batch_size=16, optimizer="nesterov", weight_decay=5e-3,
                     lr=0.05, seed=3)  # 5 epochs of 40 steps: 200 steps


def train_run(data, backend, out):
    """Train on `data` with `backend` into `out`; returns (params and optimizer state, per-epoch metrics)."""
    train(TrainConfig(data=str(data), backend=backend, out=str(out), **SYNTHETIC_RUN), log=lambda line: None)
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files if name.startswith(("param_", "optim_"))}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return arrays, metrics


@pytest.fixture(scope="module")
def numpy_run(synthetic, tmp_path_factory):
    return train_run(synthetic, "numpy", tmp_path_factory.mktemp("numpy-run"))


def test_200_training_steps_match_numpy(other, synthetic, numpy_run, tmp_path):
    """The same seed on both backends: parameters, optimizer state and every epoch's metrics agree.

    Rounding differences of one step feed into the next, so they grow over 200 steps, but training
    is contracting here rather than chaotic (weight decay, a decaying learning rate): they stay
    around 1e-6 of the parameters' scale (measured: 6e-7 for numba, and for a backend whose GEMMs
    round once from float64). rtol 1e-4 with atol 1e-4 times the largest |value| of each
    array leaves two orders of magnitude for that drift, and still fails at once if one kernel is
    off by a fraction of a percent, or if one step's update is missing.
    """
    expected_arrays, expected_metrics = numpy_run
    arrays, metrics = train_run(synthetic, other, tmp_path)
    assert sorted(arrays) == sorted(expected_arrays)
    assert "param_5" in arrays and "optim_velocity_5" in arrays
    assert int(arrays["optim_steps_taken"]) == 200
    for name, want in expected_arrays.items():
        scale = float(np.abs(want).max())
        assert_close(arrays[name], want, rtol=1e-4, atol=1e-4 * scale)

    assert len(metrics) == len(expected_metrics) == SYNTHETIC_RUN["epochs"]
    for got, want in zip(metrics, expected_metrics, strict=True):
        assert got["epoch"] == want["epoch"] and got["lr"] == want["lr"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
        # A prediction flips only for an image within rounding of the decision boundary: one at most.
        assert abs(got["train_acc"] - want["train_acc"]) * 632 <= 1 + 1e-9, (got, want)
        assert abs(got["test_acc"] - want["test_acc"]) * 300 <= 1 + 1e-9, (got, want)
    # The run learned something, so the comparison above is of a real training run.
    assert 0.6 < expected_metrics[-1]["test_acc"] < 1


def test_same_seed_and_backend_give_bit_identical_runs(other, synthetic, tmp_path):
    first, first_metrics = train_run(synthetic, other, tmp_path / "first")
    second, second_metrics = train_run(synthetic, other, tmp_path / "second")
    assert sorted(first) == sorted(second)
    for name in first:
        assert np.array_equal(first[name], second[name]), f"{name} differs between two runs of {other}"
    for a, b in zip(first_metrics, second_metrics, strict=True):
        assert ({k: v for k, v in a.items() if k not in TIMING_METRICS}
                == {k: v for k, v in b.items() if k not in TIMING_METRICS})


def test_one_two_and_three_threads_give_the_same_bits(other, synthetic, tmp_path):
    """The tiles depend on the shapes and the plan alone, so a run's numbers do not depend on how many
    threads claim them: three threads on two cores (NUMBA_NUM_THREADS=3), with a plan that cuts every
    product and pass into many tiles of unequal sizes, dropout and flips drawing on the way."""
    runs = {}
    for threads in (1, 2, 3):
        out = tmp_path / f"threads{threads}"
        result = fastnet("train", "--data", synthetic, "--backend", other, "--threads", threads, "--epochs", 2,
                             "--hidden", "100,37", "--batch-size", 50, "--dropout", 0.2, "--flip", "--seed", 4,
                             "--out", out,
                             env={"NUMBA_NUM_THREADS": "3", "FASTNET_PLAN": "tile_flops=1000,pass_elements=100"})
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["parallelism"]["threads"] == threads
        with np.load(out / "model.npz") as saved:
            runs[threads] = {name: saved[name] for name in saved.files if name.startswith("param_")}
        lines = (out / "metrics.jsonl").read_text().splitlines()
        runs[threads]["metrics"] = np.array([[m["train_loss"], m["test_loss"]] for m in map(json.loads, lines)])
    for threads in (2, 3):
        for name, value in runs[1].items():
            assert np.array_equal(runs[threads][name], value), f"{name} differs between 1 and {threads} threads"


def cli_test_accuracy(backend, out):
    result = fastnet("train", "--data", real_data_path(), "--epochs", 2, "--backend", backend, "--out", out,
                     timeout=900)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == backend
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]


@pytest.fixture(scope="module")
def numpy_cifar_accuracy(tmp_path_factory):
    return cli_test_accuracy("numpy", tmp_path_factory.mktemp("cifar-numpy"))


@pytest.mark.cifar
def test_a_cli_run_on_real_cifar_ends_within_half_a_point_of_numpys_accuracy(other, numpy_cifar_accuracy, tmp_path):
    """The default network for 2 epochs on the real CIFAR-10: test accuracies within 0.5 points. Over
    two full epochs float32 rounding differences decorrelate individual predictions near the
    boundary but cannot move the accuracy by 50 of the 10,000 test images."""
    accuracy = cli_test_accuracy(other, tmp_path / "run")
    assert numpy_cifar_accuracy > 0.35, "the numpy run did not learn"
    assert abs(accuracy - numpy_cifar_accuracy) <= 0.005, (accuracy, numpy_cifar_accuracy)
