"""Two runs, one folder: a fastnet train that finds its run folder held by another one still running
stops with one line instead of interleaving its metrics and checkpoints with the other's. The hold
is an flock, which the kernel drops when its holder dies: a run killed with kill -9 leaves nothing
that stops its resumption.

The first run is stopped with SIGSTOP while the second tries the folder, so that it certainly still
holds it then, whatever the machine's speed; SIGCONT lets it finish."""

import dataclasses
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from helpers import assert_one_line_error, fastnet, start_fastnet, write_npy

EPOCHS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(3)  # what it learns does not matter, only that it trains for a while
    return write_npy(tmp_path_factory.mktemp("lock") / "data", {
        "train_images": rng.integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8),
        "train_labels": np.arange(2000) % 3, "test_images": rng.integers(0, 256, (90, 8, 8, 3), dtype=np.uint8),
        "test_labels": np.arange(90) % 3})


def train_args(tiny, out, epochs=EPOCHS):
    return ["train", "--data", tiny, "--epochs", epochs, "--hidden", 64, "--batch-size", 16, "--checkpoint-every", 5,
            "--out", out]


def wait_for(path, process, deadline=300):
    end = time.monotonic() + deadline
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.01)


def stopped_after(tiny, out, name):
    """A run in `out`, stopped (SIGSTOP) once `name` is in its folder and before its last epoch."""
    first = start_fastnet(*train_args(tiny, out))
    wait_for(out / name, first)
    os.kill(first.pid, signal.SIGSTOP)
    # kill returns before the signal is delivered; until waitpid sees the stop, the run may still be writing.
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the first run finished before it could be stopped"
    epochs = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    assert first.poll() is None and epochs < EPOCHS, "the first run finished before it could be stopped"
    return first


def snapshot(folder):
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def finishes_every_epoch(process, out):
    os.kill(process.pid, signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    assert stdout.count(f"/{EPOCHS} ") == EPOCHS  # one log line per epoch, none from the refused run


@pytest.mark.parametrize("written, resuming, advice", [
    ("config.json", False, "wait for it to finish, or pass another --out"),
    ("checkpoint.npz", True, "wait for it to finish"),
], ids=["a second run into its folder", "resuming it"])
def test_a_running_runs_folder_is_refused_to_a_second_writer(tiny, tmp_path, written, resuming, advice):
    out = tmp_path / "run"
    first = stopped_after(tiny, out, written)
    try:
        before = snapshot(out)
        second = fastnet("train", "--resume", out) if resuming else fastnet(*train_args(tiny, out))
        assert_one_line_error(second)
        assert second.stderr.strip() == (f"fastnet: error: {out} is in use by another fastnet train (process "
                                         f"{first.pid}): {advice}")
        assert snapshot(out) == before, "the refused run wrote into the folder"
        finishes_every_epoch(first, out)
    finally:
        first.kill()


def test_the_hold_dies_with_a_killed_run(tiny, tmp_path):
    out = tmp_path / "run"
    first = stopped_after(tiny, out, "checkpoint.npz")
    try:
        assert_one_line_error(fastnet("train", "--resume", out), f"(process {first.pid})")
    finally:
        first.kill()  # SIGKILL: no handler runs, only the kernel lets go
        first.communicate()
    assert (out / ".lock").read_text().split()[0] == str(first.pid)  # the dead run's file is still there
    resumed = start_fastnet("train", "--resume", out)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert "resuming at epoch" in stdout
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    assert (out / ".lock").read_text().split()[0] == str(resumed.pid)


def test_a_run_whose_folder_is_removed_under_it_stops_with_one_line(tiny, tmp_path):
    out = tmp_path / "run"
    run = stopped_after(tiny, out, "checkpoint.npz")
    try:
        shutil.rmtree(out)
        os.kill(run.pid, signal.SIGCONT)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 3 and "Traceback" not in stderr
    assert stderr.strip() == (f"fastnet: error: cannot save to the --out folder {out}: it was removed during the run, "
                              f"with all the run had saved, then train again into a folder that nothing else removes")
    assert not out.exists()  # nothing written back into a folder of that name


def test_a_finished_runs_folder_is_free(tiny, tmp_path):
    out = tmp_path / "run"
    for _ in range(2):
        run = start_fastnet(*train_args(tiny, out, epochs=2))
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        assert (out / ".lock").read_text().split()[0] == str(run.pid)
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1, 2]
    resumed = fastnet("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "already finished its 2 epochs" in resumed.stdout
    listed = fastnet("runs", tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "run" in listed.stdout


def test_a_resumed_run_whose_checkpoint_changed_while_it_started_writes_nothing(tiny, tmp_path, monkeypatch):
    """Between loading the checkpoint and taking the folder, another run may have written it and
    ended: continuing from what was loaded would put older epochs over newer ones."""
    from fastnet import train as training
    from fastnet.errors import FastnetError
    from fastnet.run_folder import resumed_config

    out = tmp_path / "run"
    first = fastnet(*train_args(tiny, out, epochs=2))
    assert first.returncode == 0, first.stderr
    config = dataclasses.replace(resumed_config(str(out)), epochs=3)  # so that an epoch is left to resume
    warm_up = training.warm_up

    def another_run_writes_meanwhile(*args, **kwargs):
        shutil.copy(out / "checkpoint.npz", tmp_path / "newer.npz")
        os.replace(tmp_path / "newer.npz", out / "checkpoint.npz")  # as a checkpoint is written
        return warm_up(*args, **kwargs)

    monkeypatch.setattr(training, "warm_up", another_run_writes_meanwhile)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FastnetError, match=r"wrote .* while this one was starting: run the same command again"):
        training.train(config, log=lambda line: None, resume=True)
    assert (out / "metrics.jsonl").read_text() == before
