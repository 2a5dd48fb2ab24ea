"""`fastnet sweep` through the real command: Optuna's search, trials on a Dask LocalCluster, the study
in an SQLite database, and results that agree with it."""

import csv
import gc
import json
import shlex
import sqlite3

import pytest

from fastnet.run_folder import TIMING_METRICS
from fastnet.sweep import space as spaces
from fastnet.sweep.run import SweepConfig, cluster
from fastnet.sweep.trial import run_trial
from helpers import SWEEP_SPACE as SPACE
from helpers import assert_one_line_error, fastnet

SMALL = ["--val", 500, "--epochs", 3, "--hidden", 16, "--batch-size", 100]


def metrics_without_timings(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def study_trials(out):
    with sqlite3.connect(out / "study.db") as db:
        states = dict(db.execute("SELECT number, state FROM trials"))
        values = dict(db.execute("SELECT t.number, v.value FROM trials t JOIN trial_values v USING (trial_id)"))
    return {number: (state, values.get(number)) for number, state in states.items()}


@pytest.mark.cifar
def test_a_sweep_finishes_prunes_continues_on_two_workers_and_agrees_with_its_study(cifar_subset, tmp_path):
    space, out = tmp_path / "space.toml", tmp_path / "sweep"
    space.write_text(SPACE)
    common = ["sweep", "--data", cifar_subset, "--space", space, "--out", out, *SMALL]
    # One worker first: its trials run one after the other, so which of them are pruned is fixed by the seed.
    first = fastnet(*common, "--trials", 6, "--workers", 1)
    assert first.returncode == 0, first.stderr
    states = [state for state, _ in study_trials(out).values()]
    assert len(states) == 6 and "PRUNED" in states and "COMPLETE" in states

    # The same command with more trials continues the same study, now on two workers, up to 9 in all.
    second = fastnet(*common, "--trials", 9, "--workers", 2)
    assert second.returncode == 0, second.stderr
    stored = study_trials(out)
    assert sum(state in ("COMPLETE", "PRUNED") for state, _ in stored.values()) == 9
    assert "), 2 workers x 1 thread\n" in second.stdout

    with open(out / "trials.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {int(r["number"]): (r["state"], float(r["val_acc"]) if r["val_acc"] else None) for r in rows} == {
        number: (state, value) for number, (state, value) in stored.items()}
    table = second.stdout.split("\n")
    for row in rows:  # the printed table has the same trials, states and accuracies
        assert any(line.split()[:2] == [row["number"], row["state"].lower()] for line in table), row

    summary = json.loads((out / "sweep.json").read_text())
    complete = {n: v for n, (s, v) in stored.items() if s == "COMPLETE"}
    best = max(complete, key=complete.get)
    assert summary["best"]["number"] == best and summary["best"]["val_acc"] == complete[best]
    assert summary["trials"]["COMPLETE"] == len(complete) and summary["config"]["storage"].startswith("sqlite:///")
    assert summary["best"]["command"] in second.stdout

    # The reproduce command, run as printed, gives the trial's own numbers, bit for bit.
    words = shlex.split(summary["best"]["command"])
    assert words[:2] == ["fastnet", "train"]
    again = fastnet(*words[1:], "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    trial_run = out / "trials" / f"trial-{best:04d}"
    assert metrics_without_timings(tmp_path / "again") == metrics_without_timings(trial_run)
    assert max(m["val_acc"] for m in metrics_without_timings(trial_run)) == complete[best]


@pytest.mark.parametrize("args, phrases", [
    (["--val", 0], ["--val", "not positive"]),
    (["--lr", 0.1], ["--lr is given to fastnet sweep and varied by the space", "drop one"]),
    (["--trials", 0], ["--trials", "not positive"]),
    (["--pruner", "sometimes"], ["--pruner", "invalid choice"]),
    (["--epcohs", 3], ["did you mean --epochs?", "'fastnet sweep --help'"]),
    (["--dropout", 1.5], ["--dropout is given to fastnet sweep and varied by the space"]),
    (["--optimizer", "sgd", "--clip", 0], ["--clip must be a positive gradient norm"]),
])
def test_bad_sweep_input_is_one_line_and_nothing_is_written(tiny_npy, tmp_path, args, phrases):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    result = fastnet("sweep", "--data", tiny_npy, "--val", 50, "--space", space, "--out", tmp_path / "sweep", *args)
    assert_one_line_error(result, *phrases)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_without_data_or_with_a_bad_space_stops_before_anything_runs(tmp_path):
    assert_one_line_error(fastnet("sweep", "--data", tmp_path / "missing", "--out", tmp_path / "sweep"),
                          "missing")
    (tmp_path / "bad.toml").write_text("[epochs]\nlow = 1\nhigh = 3\n")
    assert_one_line_error(fastnet("sweep", "--space", tmp_path / "bad.toml", "--out", tmp_path / "sweep"),
                          "[epochs] is fixed for every trial")
    assert not (tmp_path / "sweep").exists()


def test_an_unreachable_database_is_one_line_without_its_password(tiny_npy, tmp_path):
    result = fastnet("sweep", "--data", tiny_npy, "--val", 50, "--out", tmp_path / "sweep",
                     "--storage", "postgresql://fastnet:s3cret-word@127.0.0.1:9/nowhere")
    assert_one_line_error(result, "cannot open the study in postgresql://fastnet:***@127.0.0.1:9/nowhere",
                          "check that the database runs")
    assert "s3cret-word" not in result.stderr + result.stdout
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_folder_that_cannot_be_made_is_one_line(tiny_npy, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = fastnet("sweep", "--data", tiny_npy, "--val", 50, "--out", tmp_path / "a-file" / "sweep")
    assert_one_line_error(result, f"cannot write to --out {tmp_path / 'a-file' / 'sweep'} (Not a directory)",
                          "pass a writable folder")


# --- A worker's memory from trial to trial ------------------------------------------------------------

def test_a_worker_keeps_one_storage_for_all_its_trials(tiny_npy, tmp_path):
    """A new Optuna storage per trial was a new SQLAlchemy engine, whose dialect the ORM's caches of
    compiled statements kept: the dialects alive grew by one a trial, and a worker's memory with them."""
    import optuna
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="memory", storage=url, direction="maximize")
    (tmp_path / "space.toml").write_text("[lr]\nchoices = [0.05]\n")
    job = {"study": "memory", "storage": url, "space": spaces.load(str(tmp_path / "space.toml")),
           "fixed": {"data": str(tiny_npy), "val": 60, "epochs": 1, "hidden": (4,)},
           "trials_dir": str(tmp_path / "trials"), "threads": 1, "pruner": "none", "trials": 5, "seed": 0,
           "sweep": "test"}

    def dialects():
        gc.collect()
        # type(), not isinstance(): isinstance asks a dead weak proxy among the objects for its class,
        # which raises ReferenceError.
        return sum(issubclass(type(o), sqlalchemy.engine.Dialect) for o in gc.get_objects())

    states = [run_trial(job | {"job": "test/0"})["state"]]
    after_one = dialects()
    states += [run_trial(job | {"job": f"test/{number}"})["state"] for number in range(1, 5)]

    assert states == ["COMPLETE"] * 5
    assert dialects() == after_one


def test_a_trials_warnings_are_in_its_row_of_trials_csv(tmp_path):
    """A trial's log lines go nowhere, so its warnings are kept with the trial and noted in trials.csv."""
    import numpy as np
    import optuna

    from fastnet.sweep.run import write_results
    from helpers import write_npy
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)  # class 3 has test images and no training image
    data = write_npy(tmp_path / "data", {"train_images": rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8),
                                         "train_labels": labels,
                                         "test_images": rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8),
                                         "test_labels": np.arange(40) % 4}, names=["a", "b", "c", "d"])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="warned", storage=url, direction="maximize")
    (tmp_path / "space.toml").write_text("[lr]\nchoices = [0.05]\n")
    space = spaces.load(str(tmp_path / "space.toml"))
    job = {"study": "warned", "storage": url, "space": space, "job": "test/0", "trials_dir": str(tmp_path / "trials"),
           "fixed": {"data": str(data), "val": 60, "epochs": 1, "hidden": (4,)}, "threads": 1, "pruner": "none",
           "trials": 1, "seed": 0, "sweep": "test"}
    assert run_trial(job)["state"] == "COMPLETE"
    warning = "class 'd' (3) has no training examples"
    assert any(said.startswith(warning) for said in study.trials[0].user_attrs["warnings"])
    config = SweepConfig(data=str(data), space=str(tmp_path / "space.toml"), study="warned", out=str(tmp_path))
    write_results(study, config, space, str(tmp_path), url)
    with open(tmp_path / "trials.csv", newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert row["state"] == "COMPLETE" and row["note"].startswith(f"warning: {warning}")


def test_the_local_workers_keep_no_profile_history():
    """Dask's statistical profiler keeps one profile a second of a worker's work, for 1,000 seconds: a
    sweep's own workers grew with it trial after trial, for a dashboard nobody sees."""
    with cluster(SweepConfig(workers=1)) as client:
        enabled = client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert list(enabled.values()) == [False] and list(profiling.values()) == [False]
