"""The real `fastnet` command, run in a subprocess as a user runs it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_one_line_error, fastnet


@pytest.mark.cifar
def test_train_then_evaluate_round_trip_on_real_images(cifar_subset, tmp_path):
    run = tmp_path / "run"
    trained = fastnet("train", "--data", cifar_subset, "--epochs", 2, "--hidden", "64", "--out", run)
    assert trained.returncode == 0, trained.stderr
    assert "epoch 2/2" in trained.stdout and "done: test accuracy" in trained.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
            "samples_per_second"} <= set(metrics[-1])

    evaluated = fastnet("evaluate", run / "model.npz", "--data", cifar_subset, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["accuracy"] == metrics[-1]["test_acc"]
    confusion = np.array(report["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 1000
    assert np.trace(confusion) == round(report["accuracy"] * 1000)

    table = fastnet("evaluate", run / "model.npz", "--data", cifar_subset)
    assert table.returncode == 0 and "confusion matrix" in table.stdout


def test_console_script_and_module_agree():
    script = shutil.which("fastnet")
    assert script, "the fastnet console script is not installed: pip install -e '.[dev]'"
    via_script = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert via_script.returncode == 0 and via_script.stdout == fastnet("--version").stdout
    assert via_script.stdout.startswith("fastnet ")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_sets_the_cores_a_run_uses_and_the_run_records_it(tiny_npy, tmp_path, backend, threads):
    run = tmp_path / "run"
    result = fastnet("train", "--data", tiny_npy, "--epochs", 1, "--hidden", 4, "--backend", backend,
                     "--threads", threads, "--out", run, env={"NUMBA_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["parallelism"]["threads"] == threads
    blas = {lib["filepath"]: lib["threads"] for lib in config["blas"]}
    if backend == "numpy":  # BLAS's own threads are the cores
        assert blas and set(blas.values()) == {threads}, blas
    else:  # the driver's tiles are: the BLAS it calls stays on one thread
        assert blas[config["parallelism"]["blas_path"]] == 1, blas


def test_more_threads_than_numba_started_with_is_one_line(tiny_npy, tmp_path):
    result = fastnet("train", "--data", tiny_npy, "--epochs", 1, "--hidden", 4, "--backend", "numba",
                     "--threads", 3, "--out", tmp_path / "run", env={"NUMBA_NUM_THREADS": "2"})
    assert_one_line_error(result, "--threads 3 is more than the 2 threads", "NUMBA_NUM_THREADS=3")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--pca", "6", "--ema", "0.999"],  # 512 components are more than 48 pixels
     {"norm": "layernorm", "translate": 2, "pca": 6, "backend": "numba", "ema": 0.999}),
    (["--norm", "none", "--translate", "0", "--pca", "0", "--backend", "numpy", "--ema", "none"],
     {"norm": None, "translate": 0, "pca": 0, "backend": "numpy", "ema": None}),
], ids=["recipe", "overridden"])
def test_flags_override_a_recipe_even_to_none(tiny_npy, tmp_path, flags, expected):
    result = fastnet("train", "--data", tiny_npy, "--recipe", "best", "--epochs", 1, "--hidden", 4, *flags,
                     "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {name: config[name] for name in expected} == expected and config["dropout"] == 0.1


def test_ema_takes_a_decay_or_none():
    import argparse

    from fastnet.cli.flag_types import decay_or_none

    assert decay_or_none("none") is None and decay_or_none("0.9995") == 0.9995
    with pytest.raises(argparse.ArgumentTypeError, match=r"'abc' is not a decay: pass one such as 0\.9998, or none"):
        decay_or_none("abc")


def test_data_comes_from_fastnet_data_when_no_flag(tiny_npy, tmp_path):
    result = fastnet("train", "--epochs", 1, "--hidden", 4, "--batch-size", 50, "--out", tmp_path / "run",
                     env={"FASTNET_DATA": str(tiny_npy)})
    assert result.returncode == 0, result.stderr
    assert str(tiny_npy) in result.stdout


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    # 300 classes: the confusion matrix is far larger than a pipe's buffer, so the writer is still
    # writing when the reader goes away.
    rng = np.random.default_rng(0)
    for split, count in (("train", 600), ("test", 300)):
        np.save(tmp_path / f"{split}_images.npy", rng.integers(0, 256, (count, 2, 2), dtype=np.uint8))
        np.save(tmp_path / f"{split}_labels.npy", np.arange(count) % 300)
    trained = fastnet("train", "--data", tmp_path, "--epochs", 1, "--hidden", 4, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    command = [sys.executable, "-m", "fastnet", "evaluate", str(tmp_path / "run" / "model.npz"),
               "--data", str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.readline().startswith(b"test accuracy")
        process.stdout.close()  # like `| head -1`
        stderr = process.stderr.read().decode()
    assert process.returncode == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_evaluate_and_predict_take_a_run_folder_as_plot_and_resume_do(tiny_npy, tmp_path):
    from PIL import Image
    run = tmp_path / "run"
    trained = fastnet("train", "--data", tiny_npy, "--epochs", 1, "--hidden", 4, "--out", run)
    assert trained.returncode == 0, trained.stderr
    # One epoch, so the model is the last epoch's: no second accuracy, no "1 epochs".
    done = trained.stdout.strip().splitlines()[-1]
    assert " after 1 epoch; model in " in done and done.count("test accuracy") == 1, done
    by_folder = fastnet("evaluate", run, "--data", tiny_npy, "--json")
    assert by_folder.returncode == 0, by_folder.stderr
    assert json.loads(by_folder.stdout) == json.loads(fastnet("evaluate", run / "model.npz", "--data", tiny_npy,
                                                              "--json").stdout)
    image = tmp_path / "bright.png"
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(image)
    predicted = [json.loads(fastnet("predict", model, image, "--json").stdout)["predictions"]
                 for model in (run, run / "model.npz")]
    assert predicted[0] == predicted[1] and predicted[0][0]["top"]
    (tmp_path / "empty").mkdir()
    for command in ("evaluate", "predict"):
        extra = ["--data", tiny_npy] if command == "evaluate" else [image]
        assert_one_line_error(fastnet(command, tmp_path / "empty", *extra), "is a folder without a model.npz",
                              "pass a run folder that fastnet train wrote")


def test_a_model_evaluated_on_other_data_names_the_data_it_was_trained_on(tiny_npy, tmp_path):
    run = tmp_path / "run"
    assert fastnet("train", "--data", tiny_npy, "--epochs", 1, "--hidden", 4, "--out", run).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.save(other / f"{split}_images.npy", rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
        np.save(other / f"{split}_labels.npy", rng.integers(0, 3, 20).astype(np.uint8))
    trained_on = json.loads((run / "config.json").read_text())["data_source"]
    assert_one_line_error(fastnet("evaluate", run, "--data", other), f"was trained on {trained_on} (48 inputs, 3 "
                          "classes)", "has 192 inputs and 3 classes", "pass that data with --data")


@pytest.mark.parametrize("args, suggestion, command", [
    (["train", "--epcohs", "3"], "did you mean --epochs?", "fastnet train"),
    (["train", "--epochs", "3", "--qqqq=0.1"], "unrecognized arguments: --qqqq=0.1: see", "fastnet train"),
    (["data", "download", "--tto", "x"], "did you mean --to?", "fastnet data download"),
    (["evaluate", "run", "--jsn"], "did you mean --json?", "fastnet evaluate"),
])
def test_a_mistyped_flag_gets_the_nearest_flag_and_its_commands_help(args, suggestion, command):
    assert_one_line_error(fastnet(*args), suggestion, f"'{command} --help'")
