"""Storage faults lose nothing, through the real `fastnet` command in a subprocess.

A write that the storage refuses (a full disk, ENOSPC; an I/O error, EIO; a quota, EDQUOT; a
filesystem gone read-only, EROFS) ends the command with exit status 3 and one line that names the
file, the system's reason, the filesystem and what to run once it is fixed; no temporary file is
left, and every file keeps its last whole version. For `fastnet train` that is the last good
checkpoint, which `--resume` continues to the bits of a run that never failed (before the first
checkpoint, the same command starts again). The image cache is an exception: it only saves time,
so a failed cache write is one warning and the run goes on.

How the faults get in: tests/fault_injection/sitecustomize.py, put first on the command's
PYTHONPATH, which Python imports at startup. It wraps the calls that every write goes through
(io.open for writing, os.pwrite, os.mkdir, os.replace, os.rename) and counts those on the paths a
glob matches: in record mode it lists them; else it fails the k-th as a full disk would, a file
getting half of its first write first. Nothing in fastnet knows about it. The writes of a run are
recorded once and compared with RUN_WRITES, so that a new write in fastnet shows up here; each of
them is then failed in turn.
"""

import errno
import json
import os
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest

from fastnet import checkpoint, storage
from helpers import (
    ROOT,
    SWEEP_SPACE,
    assert_same_outcome,
    fastnet,
    make_tree,
    save_brightness_classes,
    save_image,
)

HOOK = ROOT / "tests" / "fault_injection"
# What each error's line tells to do, up to the filesystem's mount point.
REMEDIES = {"ENOSPC": "free space on the filesystem mounted at", "EIO": "check the disk of the filesystem mounted at",
            "EDQUOT": "free space on the filesystem mounted at", "EROFS": "make the filesystem mounted at"}

# The writes of `fastnet train` for 2 epochs, as (kind, name in the run folder): a file written under a
# temporary name is its final name's write and then its rename.
EPOCH_WRITES = [("write", "metrics.jsonl"), ("rename", "metrics.jsonl"), ("write", "model.npz"),
                ("rename", "model.npz"), ("write", "checkpoint.npz"), ("rename", "checkpoint.npz")]
RUN_WRITES = [("mkdir", ""), ("write", ".fastnet-write-test"), ("write", ".lock"), ("write", "config.json"),
              ("rename", "config.json"), ("write", "metrics.jsonl"), ("rename", "metrics.jsonl"),
              *EPOCH_WRITES, *EPOCH_WRITES]
# Every write fails with ENOSPC; some with the other errors too.
FAULTS = [(k, "ENOSPC") for k in range(1, len(RUN_WRITES) + 1)] + [
    (4, "EDQUOT"), (10, "EROFS"), (12, "EIO"), (15, "EIO"), (19, "EIO")]


def with_fault(paths, at=1, errno_name="ENOSPC"):
    """The environment of a command whose `at`-th write to a path matching the glob `paths` fails."""
    return hooked(FAULT_PATHS=paths, FAULT_AT=str(at), FAULT_ERRNO=errno_name)


def hooked(**variables):
    search_path = [str(HOOK), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(search_path), **variables}


def mount_point(path):
    """Where df says the filesystem of `path` is mounted."""
    shown = subprocess.run(["df", "--output=target", path], capture_output=True, text=True, check=True).stdout
    return shown.splitlines()[1].strip()


def assert_storage_error(result, path, errno_name, then):
    """Exit status 3 and one line: the file, the system's reason, what to do about it, and `then`."""
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    reason = os.strerror(getattr(errno, errno_name))
    existing = next(p for p in (path, *path.parents) if p.exists())
    assert lines[0].startswith(f"fastnet: error: cannot write {path} ({reason}): {REMEDIES[errno_name]} "
                               f"{mount_point(existing)}"), lines[0]
    assert lines[0].endswith(f", then {then}"), lines[0]


def leftovers(folder):
    """Temporaries of a write that failed, in `folder` and below."""
    return [p for p in folder.rglob("*") if p.name.startswith((storage.TEMPORARY_PREFIX, ".fastnet-write-test"))
            or p.suffix in (".tmp", ".part")]


def progress(run):
    return json.loads(str(checkpoint.load(str(run / "checkpoint.npz")).arrays["progress"]))


def same_model(run, reference):
    ours, theirs = checkpoint.load(str(run / "model.npz")), checkpoint.load(str(reference / "model.npz"))
    return all(np.array_equal(p, q) for p, q in zip(ours.net.params, theirs.net.params, strict=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A learnable 3-class npy dataset of 4x4 images."""
    return save_brightness_classes(tmp_path_factory.mktemp("tiny"), np.random.default_rng(0),
                                   {"train": 300, "test": 90}, side=4, step=80, base=40, noise=20)


def train_args(tiny, out):
    return ["train", "--data", tiny, "--epochs", 2, "--hidden", 4, "--out", out]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The run folder of the run that never failed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = fastnet(*train_args(tiny, out))
    assert result.returncode == 0, result.stderr
    return out


# --- fastnet train ----------------------------------------------------------------------------------

def test_the_hook_sees_every_write_of_a_run_and_the_checkpoint_comes_last(tiny, tmp_path):
    run, record = tmp_path / "run", tmp_path / "writes.txt"
    result = fastnet(*train_args(tiny, run), env=hooked(FAULT_PATHS=f"{run}*", FAULT_RECORD=str(record)))
    assert result.returncode == 0, result.stderr
    events = [line.split() for line in record.read_text().splitlines()]
    renamed = {words[1]: words[2] for words in events if words[0] == "rename"}  # a temporary: its final name
    seen = [(words[0], os.path.relpath(renamed.get(words[-1], words[-1]), run)) for words in events]
    assert seen == [(kind, name or ".") for kind, name in RUN_WRITES]


@pytest.mark.parametrize("at, errno_name", FAULTS,
                         ids=[f"{k:02d}-{RUN_WRITES[k - 1][0]}-{RUN_WRITES[k - 1][1] or 'folder'}-{e}"
                              for k, e in FAULTS])
def test_a_failed_write_is_one_line_and_the_run_continues_to_the_same_bits(at, errno_name, tiny, reference,
                                                                           tmp_path):
    run = tmp_path / "run"
    kind, name = RUN_WRITES[at - 1]
    failed = fastnet(*train_args(tiny, run), env=with_fault(f"{run}*", at, errno_name))

    assert not leftovers(tmp_path)
    named = run if name in ("", ".fastnet-write-test") else run / name  # the probe of --out: the folder
    checkpoints = RUN_WRITES[:at - 1].count(("rename", "checkpoint.npz"))
    if checkpoints:  # the last good one is there, whole, and --resume continues it
        saved = progress(run)
        assert saved["epochs_done"] == checkpoints
        assert_storage_error(failed, named, errno_name, f"continue from the checkpoint at step {saved['step']} "
                                                        f"with: fastnet train --resume {run}")
        again = fastnet("train", "--resume", run)
    else:  # nothing to resume: the same command starts the run again
        assert not (run / "checkpoint.npz").exists()
        assert_storage_error(failed, named, errno_name, "run the same command again")
        again = fastnet(*train_args(tiny, run))
    assert again.returncode == 0, again.stderr
    assert_same_outcome(run, reference)
    assert same_model(run, reference)


def test_a_failed_plot_after_training_says_how_to_draw_it(tiny, reference, tmp_path):
    run = tmp_path / "run"
    failed = fastnet(*train_args(tiny, run), "--plot", env=with_fault(str(run / "curves.png")))
    assert_storage_error(failed, run / "curves.png", "ENOSPC", f"draw the plots with: fastnet plot {run}")
    assert not leftovers(tmp_path) and not (run / "curves.png").exists()
    assert progress(run)["epochs_done"] == 2  # the run itself is whole
    assert_same_outcome(run, reference)
    drawn = fastnet("plot", run)
    assert drawn.returncode == 0, drawn.stderr
    assert (run / "curves.png").is_file() and (run / "confusion.png").is_file()


# --- The other commands' files ----------------------------------------------------------------------

@pytest.mark.parametrize("at, errno_name", [(1, "EIO"), (2, "ENOSPC")], ids=["curves-write", "confusion-write"])
def test_a_failed_plot_leaves_no_half_picture(at, errno_name, reference, tmp_path):
    run = shutil.copytree(reference, tmp_path / "run")
    failed = fastnet("plot", run, env=with_fault(str(run / f"{storage.TEMPORARY_PREFIX}*"), at, errno_name))
    picture = run / ("curves.png" if at == 1 else "confusion.png")
    assert_storage_error(failed, picture, errno_name, "run the same command again")
    assert not leftovers(tmp_path) and not picture.exists()


@pytest.mark.parametrize("at", [1, 2], ids=["write", "rename"])
def test_a_failed_predict_csv_leaves_nothing(at, reference, tmp_path):
    save_image(tmp_path / "photos" / "a.png", "RGB", np.random.default_rng(0), size=(4, 4))
    (tmp_path / "out").mkdir()
    table = tmp_path / "out" / "predictions.csv"
    failed = fastnet("predict", reference, tmp_path / "photos", "--csv", table,
                     env=with_fault(str(tmp_path / "out" / "*"), at))
    assert_storage_error(failed, table, "ENOSPC", "run the same command again")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("at", [1, 2], ids=["write", "rename"])
def test_a_failed_export_leaves_nothing(at, reference, tmp_path):
    (tmp_path / "out").mkdir()
    to = tmp_path / "out" / "model.onnx"
    failed = fastnet("export", reference, "--to", to, env=with_fault(str(tmp_path / "out" / "*"), at, "EIO"))
    assert_storage_error(failed, to, "EIO", "run the same command again")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("at", [1, 2, 3], ids=["folder", "write", "rename"])
def test_a_failed_evaluation_report_leaves_nothing(at, tiny, reference, tmp_path):
    out = tmp_path / "report"
    failed = fastnet("evaluate", reference, "--data", tiny, "--out", out, env=with_fault(f"{out}*", at))
    assert_storage_error(failed, out if at == 1 else out / "report.json", "ENOSPC", "run the same command again")
    assert not leftovers(tmp_path) and not (out / "report.json").exists()


@pytest.mark.parametrize("at, errno_name", [(1, "ENOSPC"), (2, "EIO")], ids=["write", "rename"])
def test_a_failed_image_cache_write_is_a_warning_and_the_run_goes_on(at, errno_name, tmp_path):
    cache = tmp_path / "cache"
    tree = make_tree(tmp_path / "pets", np.random.default_rng(0))
    run = tmp_path / "run"
    result = fastnet("train", "--data", tree, "--epochs", 1, "--hidden", 4, "--batch-size", 9, "--out", run,
                     env=with_fault(f"{cache}/images/*", at, errno_name) | {"FASTNET_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: could not cache")]
    reason = os.strerror(getattr(errno, errno_name))
    log = " (the system log says what failed)" if errno_name == "EIO" else ""
    assert warnings == [(f"warning: could not cache the decoded images in {cache / 'images'} ({reason}), so the "
                         f"next run decodes them again: {REMEDIES[errno_name]} {mount_point(cache)}{log}, or set "
                         f"FASTNET_CACHE to a folder on another disk")], result.stdout
    assert not leftovers(cache)
    assert len(list((cache / "images").glob("*.npy"))) == 1  # the other split's, written whole
    assert (run / "model.npz").is_file()


# --- fastnet sweep ----------------------------------------------------------------------------------

def sweep_args(tiny, out, space):
    space.write_text(SWEEP_SPACE)
    return ["sweep", "--data", tiny, "--space", space, "--val", 50, "--epochs", 1, "--trials", 1, "--workers", 1,
            "--hidden", 4, "--out", out]


def study_trials(out):
    """{number: (state, lr)} of the study in the sweep folder `out`."""
    with sqlite3.connect(out / "study.db") as db:
        return {number: (state, lr) for number, state, lr in db.execute(
            "SELECT t.number, t.state, p.param_value FROM trials t JOIN trial_params p USING (trial_id) "
            "WHERE p.param_name = 'lr'")}


def test_a_trial_that_cannot_write_stops_the_sweep_and_its_settings_are_tried_again(tiny, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(tiny, out, tmp_path / "space.toml")
    failed = fastnet(*args, env=with_fault(f"{out}/trials/*"))
    assert_storage_error(failed, out / "trials" / "trial-0000", "ENOSPC",
                         "run the same command again: it continues the study, and tries the settings of trial 0 "
                         "again")
    assert not leftovers(tmp_path) and not (out / "trials.csv").exists()

    again = fastnet(*args)
    assert again.returncode == 0, again.stderr
    trials = study_trials(out)
    assert [state for state, _ in trials.values()] == ["FAIL", "COMPLETE"] and trials[0][1] == trials[1][1]
    assert "retry of trial 0" in (out / "trials.csv").read_text()


@pytest.mark.parametrize("paths, name", [(f"{storage.TEMPORARY_PREFIX}*", "trials.csv"), ("sweep.json", "sweep.json")],
                         ids=["trials.csv-write", "sweep.json-rename"])
def test_a_sweep_whose_results_cannot_be_written_writes_them_when_run_again(paths, name, tiny, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(tiny, out, tmp_path / "space.toml")
    failed = fastnet(*args, env=with_fault(str(out / paths)))
    assert_storage_error(failed, out / name, "ENOSPC", "run the same command again")
    assert not leftovers(tmp_path) and not (out / name).exists()
    assert [state for state, _ in study_trials(out).values()] == ["COMPLETE"]

    again = fastnet(*args)
    assert again.returncode == 0, again.stderr
    assert [state for state, _ in study_trials(out).values()] == ["COMPLETE"]  # no trial ran again
    assert json.loads((out / "sweep.json").read_text())["trials"]["COMPLETE"] == 1
    assert (out / "trials.csv").read_text().startswith("number,state,val_acc")


def test_a_sweep_folder_that_cannot_be_made_is_one_line(tiny, tmp_path):
    out = tmp_path / "sweep"
    failed = fastnet(*sweep_args(tiny, out, tmp_path / "space.toml"), env=with_fault(str(out), 1, "EROFS"))
    assert_storage_error(failed, out, "EROFS", "run the same command again")
    assert not out.exists()
