"""`fastnet sweep` beyond one process, and when things go wrong, through the real command on
loopback: a study in PostgreSQL shared by two sweep processes, trials on a Dask cluster reached over
tls://, a worker killed mid-trial, Ctrl-C and a continued study, a database that goes away
mid-sweep, and optuna-dashboard's page of a study in a real browser.

The PostgreSQL server is the one .ci/run starts (FASTNET_TEST_POSTGRES), or one started here with
tools/postgres.sh; the test of a database that goes away starts and stops a server of its own.
"""

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import optuna
import psutil
import pytest
import sqlalchemy

from helpers import SWEEP_SPACE, assert_one_line_error, fastnet, save_brightness_classes, start_fastnet

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# About 0.1 s an epoch on the synthetic images below, on one thread: a trial of 15 epochs or more is
# long enough to be caught in the middle.
QUICK = ["--val", 400, "--hidden", 64, "--batch-size", 8, "--backend", "numpy"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A synthetic, learnable 3-class npy dataset of 8x8 images."""
    return save_brightness_classes(tmp_path_factory.mktemp("sweep-images"), np.random.default_rng(0),
                                   {"train": 2400, "test": 200}, side=8, step=80, base=40, noise=20)


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SWEEP_SPACE)
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_postgres(folder=None, port=None):
    """(url, folder) of a server started by tools/postgres.sh: a new one, or the one in `folder` again."""
    port = port or free_port()
    words = subprocess.run(["bash", ROOT / "tools" / "postgres.sh", "start", str(port), *([folder] if folder else [])],
                           check=True, capture_output=True, text=True).stdout.split()
    return words[0], words[1]


def postgres(command, folder):
    subprocess.run(["bash", ROOT / "tools" / "postgres.sh", command, folder], check=True, capture_output=True)


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get("FASTNET_TEST_POSTGRES"):
        yield os.environ["FASTNET_TEST_POSTGRES"]
        return
    url, folder = start_postgres()
    yield url
    postgres("remove", folder)


def trials_of(storage, study="fastnet"):
    return optuna.load_study(study_name=study, storage=storage).trials


def finished_so_far(url):
    """{number: (state, value)} of the finished trials; {} before the sweep created its study (which
    this reader leaves to the sweep: it creates no tables)."""
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        return {t.number: (t.state, t.value) for t in trials_of(storage) if t.state in FINISHED}
    except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
        return {}


def sqlite_rows(out):
    """{number: (state, user attributes)} of the study in a sweep folder, read as SQLite readers do,
    while the sweep may be writing it."""
    with sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True, timeout=30) as db:
        states = dict(db.execute("SELECT trial_id, state FROM trials"))
        numbers = dict(db.execute("SELECT trial_id, number FROM trials"))
        attrs = {}
        for trial, key, value in db.execute("SELECT trial_id, key, value_json FROM trial_user_attributes"):
            attrs.setdefault(trial, {})[key] = json.loads(value)
    return {numbers[t]: (states[t], attrs.get(t, {})) for t in states}


def running_trial_past_its_first_epoch(out, sweep, timeout=120, at_most=5):
    """(number, user attributes) of a running trial with at least one epoch in its run folder, and at
    most `at_most`: one near its end could finish the whole sweep before the caller acts on it (a
    loaded machine polls slowly), and the sweep would then exit as done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sweep.poll() is None, sweep.communicate()
        if (out / "study.db").exists():
            try:
                rows = sqlite_rows(out)
            except sqlite3.OperationalError:  # the sweep is creating its tables
                rows = {}
            for number, (state, attrs) in rows.items():
                metrics = Path(attrs.get("out", "/nowhere")) / "metrics.jsonl"
                epochs = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
                if state == "RUNNING" and "pid" in attrs and 1 <= epochs <= at_most:
                    return number, attrs
        time.sleep(0.05)
    raise AssertionError("no trial got past its first epoch")


def finished_in_csv(out):
    with open(out / "trials.csv", newline="") as file:
        return {int(row["number"]): row for row in csv.DictReader(file)}


# --- PostgreSQL ------------------------------------------------------------------------------------

def test_two_sweeps_share_one_postgresql_study_and_no_trial_runs_twice(postgres_url, images, space, tmp_path):
    study = f"shared-{uuid.uuid4().hex[:8]}"
    common = ["sweep", "--data", images, "--space", space, "--storage", postgres_url, "--study", study,
              "--trials", 6, "--workers", 1, "--epochs", 3, *QUICK]
    sweeps = [start_fastnet(*common, "--out", tmp_path / name) for name in ("a", "b")]
    printed = [sweep.communicate(timeout=300) for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], printed

    trials = trials_of(postgres_url, study)
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 6 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len({t.user_attrs["sweep"] for t in finished}) == 2  # both contributed
    folders = {name: {p.name for p in (tmp_path / name / "trials").iterdir()} for name in ("a", "b")}
    assert folders["a"] and folders["b"] and not folders["a"] & folders["b"]  # no trial number ran twice
    assert folders["a"] | folders["b"] == {f"trial-{t.number:04d}" for t in trials}

    password = urlsplit(postgres_url).password
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".npz"]
    assert not [text for text in [*sum(printed, ()), *written] if password in text]
    assert "postgresql://fastnet:***@" in printed[0][0]


def test_a_database_that_goes_away_mid_sweep_stops_it_with_status_3_and_keeps_its_trials(images, space, tmp_path):
    url, folder = start_postgres()
    try:
        sweep = start_fastnet("sweep", "--data", images, "--space", space, "--storage", url, "--trials", 50,
                              "--workers", 1, "--epochs", 4, "--out", tmp_path / "sweep", *QUICK)
        deadline = time.monotonic() + 120
        while not finished_so_far(url) and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.2)
        recorded = finished_so_far(url)
        assert recorded, sweep.communicate()
        postgres("stop", folder)
        stdout, stderr = sweep.communicate(timeout=120)
        assert sweep.returncode == 3, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastnet: error: lost the study's database "
                                                       "postgresql://fastnet:***@127.0.0.1:"), stderr
        assert "when it is back, the same command continues" in lines[0]
        assert urlsplit(url).password not in stdout + stderr

        url, _ = start_postgres(folder, urlsplit(url).port)
        kept = {t.number: (t.state, t.value) for t in trials_of(url)}
        assert {number: kept[number] for number in recorded} == recorded  # nothing recorded was lost
    finally:
        postgres("remove", folder)


# --- Faults ----------------------------------------------------------------------------------------

def test_a_worker_killed_mid_trial_fails_that_trial_and_tries_its_settings_again(images, space, tmp_path):
    out = tmp_path / "sweep"
    sweep = start_fastnet("sweep", "--data", images, "--space", space, "--trials", 2, "--workers", 1,
                          "--epochs", 20, "--pruner", "none", "--out", out, *QUICK)
    victim, attrs = running_trial_past_its_first_epoch(out, sweep)
    os.kill(attrs["pid"], signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr

    trials = trials_of(f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and optuna.trial.TrialState.RUNNING not in states
    assert trials[victim].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim]
    assert len(retries) == 1 and retries[0].params == trials[victim].params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    rows = finished_in_csv(out)
    assert rows[victim]["state"] == "FAIL" and rows[victim]["note"] == "its worker died"
    assert rows[retries[0].number]["note"] == f"retry of trial {victim}"


def test_ctrl_c_marks_running_trials_stopped_and_the_same_command_continues_to_n_in_all(images, space, tmp_path):
    out = tmp_path / "sweep"
    command = ["sweep", "--data", images, "--space", space, "--trials", 3, "--workers", 1, "--epochs", 15,
               "--pruner", "none", "--out", out, *QUICK]
    sweep = start_fastnet(*command)
    stopped, _ = running_trial_past_its_first_epoch(out, sweep)
    os.killpg(sweep.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the sweep and its workers
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastnet: sweep stopped by Ctrl-C: 1 running trials marked "
                                                   "stopped"), stderr
    trials = trials_of(f"sqlite:///{out / 'study.db'}")
    assert trials[stopped].state == optuna.trial.TrialState.FAIL
    assert trials[stopped].user_attrs["ended"] == "stopped by Ctrl-C"
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials]
    done_before = sum(t.state in FINISHED for t in trials)
    assert f"{done_before} of 3 done; the same command continues the study" in lines[0]
    assert finished_in_csv(out)[stopped]["note"] == "stopped by Ctrl-C"

    again = fastnet(*command)
    assert again.returncode == 0, again.stderr
    trials = trials_of(f"sqlite:///{out / 'study.db'}")
    assert sum(t.state in FINISHED for t in trials) == 3  # 3 in all, not 3 more
    assert len(trials) == stopped + 1 + 3 - done_before  # one worker: trials 0 to `stopped` ran before


# --- A Dask cluster over TLS -----------------------------------------------------------------------

def certificates(folder):
    """A certificate authority and one certificate it signed for 127.0.0.1, as Dask's TLS takes them."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=fastnet test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (folder / "node.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "node.pem", "-days", "1", "-extfile", "node.ext")
    return ["--tls-ca-file", folder / "ca.pem", "--tls-cert", folder / "node.pem", "--tls-key", folder / "node.key"]


def test_a_sweep_runs_its_trials_on_a_dask_cluster_over_tls(images, space, tmp_path):
    tls = certificates(tmp_path)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls",
                                  "--no-dashboard", *map(str, tls)], stderr=subprocess.PIPE, cwd=tmp_path)
    workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                                "--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path / "scratch"),
                                *map(str, tls)], stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        out = tmp_path / "sweep"
        common = ["sweep", "--data", images, "--space", space, "--out", out, "--scheduler", address]
        # Without TLS, the scheduler cannot be reached: one line, and nothing is written.
        plain = ["sweep", "--data", images, "--space", space, "--out", out, "--scheduler", f"tcp://127.0.0.1:{port}"]
        assert_one_line_error(fastnet(*plain), f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
        assert not out.exists()

        result = fastnet(*common, *tls, "--trials", 4, "--epochs", 3, *QUICK)
        assert result.returncode == 0, result.stderr
        assert "), 2 workers x 1 thread\n" in result.stdout
        trials = trials_of(f"sqlite:///{out / 'study.db'}")
        assert sum(t.state in FINISHED for t in trials) == 4
        worker_pids = {p.pid for p in psutil.Process(workers.pid).children(recursive=True)}
        assert {t.user_attrs["pid"] for t in trials} <= worker_pids  # the cluster's workers ran them
    finally:
        for process in (workers, scheduler):
            process.terminate()
            process.wait(timeout=60)


def test_an_unreachable_scheduler_is_one_line_and_nothing_is_written(images, tmp_path):
    result = fastnet("sweep", "--data", images, "--out", tmp_path / "sweep", "--scheduler",
                     f"tcp://127.0.0.1:{free_port()}")
    assert_one_line_error(result, "cannot reach the Dask scheduler at tcp://127.0.0.1:", "start it with 'dask "
                                                                                         "scheduler'")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, phrases", [
    (["--scheduler", "127.0.0.1:8786"], ["--scheduler '127.0.0.1:8786' is not a Dask address", "tcp://HOST:8786"]),
    (["--scheduler", "tcp://127.0.0.1:8786", "--workers", 2], ["--workers starts workers on this machine"]),
    (["--scheduler", "tcp://127.0.0.1:8786", "--tls-ca-file", "ca.pem"], ["--tls-ca-file is for a tls:// scheduler"]),
    (["--scheduler", "tls://127.0.0.1:8786", "--tls-ca-file", "ca.pem"], ["needs --tls-cert too"]),
    (["--scheduler", "tls://127.0.0.1:8786"], ["a tls:// scheduler needs Dask's certificates: give --tls-ca-file"]),
    (["--scheduler", "tls://127.0.0.1:8786", "--tls-ca-file", "ca.pem", "--tls-cert", "a.pem", "--tls-key", "a.key"],
     ["--tls-ca-file ca.pem is not a file"]),
])
def test_bad_cluster_settings_are_one_line_before_anything_runs(images, tmp_path, args, phrases):
    assert_one_line_error(fastnet("sweep", "--data", images, "--out", tmp_path / "sweep", *args), *phrases)
    assert not (tmp_path / "sweep").exists()


# --- optuna-dashboard ------------------------------------------------------------------------------

def test_optuna_dashboard_shows_a_sweeps_study_in_a_browser(images, space, tmp_path):
    out = tmp_path / "sweep"
    result = fastnet("sweep", "--data", images, "--space", space, "--out", out, "--trials", 3, "--epochs", 2,
                     "--workers", 1, *QUICK)
    assert result.returncode == 0, result.stderr
    checker = ROOT / "tools" / "check_study_dashboard.py"
    check = subprocess.run([sys.executable, checker, f"sqlite:///{out / 'study.db'}"], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    best = json.loads((out / "sweep.json").read_text())["best"]
    assert f"shown   best trial {best['number']}" in check.stdout
    assert check.stdout.count("shown   setting ") == 2  # lr and dropout, the space's two
