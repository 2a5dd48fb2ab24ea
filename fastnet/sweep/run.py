"""The driver of `fastnet sweep`: check everything, open the study, keep the Dask workers busy with
trials until the study holds the trials asked for, then write the results.

The study lives in Optuna's RDB storage (an SQLite file in the sweep folder unless --storage says
otherwise), so the driver counts finished trials there, those of every sweep process on the same
study: run again, the same command continues the study up to its number of trials in all, and
several processes on one PostgreSQL study stop together at it. The workers are a LocalCluster
started here, or those of the Dask scheduler at --scheduler (tcp://, or tls:// with Dask's
certificates). A trial that fails (it diverged, or its worker died) is recorded as failed, with why
in trials.csv, and another takes its place; the settings of one whose worker died are tried again.
Ctrl-C marks this sweep's running trials stopped; a database lost mid-sweep is DatabaseLost (exit
status 3), since what it recorded is kept, and a file that the storage refuses (a trial's, or the
results) is a StorageError (exit status 3 too), since the study keeps every trial.
"""

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
import warnings
from datetime import datetime

from fastnet import data, storage
from fastnet import settings as rules
from fastnet.config import TrainConfig
from fastnet.errors import DatabaseLost, FastnetError, Interrupted, SettingError, StorageError
from fastnet.sweep import space as spaces
from fastnet.sweep import trial as trials
from fastnet.sweep.trial import run_trial

PRUNERS = ("median", "hyperband", "none")
FINISHED = ("COMPLETE", "PRUNED")
CONNECT_TIMEOUT = 10  # seconds to reach a Dask scheduler
# The pip package of each database driver SQLAlchemy may ask for.
DRIVERS = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pymysql": "pymysql"}


@dataclasses.dataclass
class SweepConfig:
    data: str | None = None
    space: str | None = None          # a TOML file; None: fastnet's default space
    trials: int = 20                  # finished (complete or pruned) trials the study ends with
    timeout: float | None = None      # minutes; no new trial starts after it
    workers: int | None = None        # Dask worker processes on this machine; None: one per core
    scheduler: str | None = None      # the address of a running Dask scheduler, instead of workers here
    tls_ca_file: str | None = None    # with a tls:// scheduler: Dask's certificates, as dask worker takes them
    tls_cert: str | None = None
    tls_key: str | None = None
    threads_per_trial: int = 1
    storage: str | None = None        # an Optuna RDB URL; None: sqlite in the sweep folder
    study: str = "fastnet"
    val: int = 5000
    epochs: int = 18
    pruner: str = "median"
    seed: int = 0
    out: str | None = None
    backend: str | None = None
    fixed: dict = dataclasses.field(default_factory=dict)  # fastnet train settings every trial shares

    def check(self):
        """The loaded space, once every setting is one a sweep can use."""
        rules.positive_integer("trials", self.trials, 20)
        rules.positive_integer("threads_per_trial", self.threads_per_trial, 1)
        if self.workers is not None:
            rules.positive_integer("workers", self.workers, os.cpu_count())
            if self.scheduler is not None:
                raise SettingError("workers", "{setting} starts workers on this machine, --scheduler uses a "
                                              "cluster's: give one of the two")
        self.check_cluster()
        if self.timeout is not None:
            rules.positive_number("timeout", self.timeout, 60)
        rules.positive_integer("val", self.val, 5000)  # trials are chosen on it: the test set never is
        rules.one_of("pruner", self.pruner, PRUNERS)
        space = spaces.load(self.space)
        both = sorted(set(self.fixed) & set(space.settings))
        if both:
            raise SettingError(both[0], f"{{setting}} is given to fastnet sweep and varied by the space "
                                        f"{space.path}: drop one of the two")
        TrainConfig(**self.trial_settings()).check()
        return space

    def check_cluster(self):
        tls = {"tls_ca_file": self.tls_ca_file, "tls_cert": self.tls_cert, "tls_key": self.tls_key}
        if self.scheduler is not None and "://" not in self.scheduler:
            raise SettingError("scheduler", f"{{setting}} {self.scheduler!r} is not a Dask address: write it as "
                                            f"tcp://HOST:8786, or tls://HOST:8786 with Dask's certificates")
        given = [name for name, path in tls.items() if path is not None]
        if (self.scheduler or "").startswith("tls://") and not given and not _dask_tls_configured():
            raise SettingError("scheduler", "a tls:// scheduler needs Dask's certificates: give --tls-ca-file, "
                                            "--tls-cert and --tls-key, or set them in Dask's configuration")
        if given and not (self.scheduler or "").startswith("tls://"):
            raise SettingError(given[0], "{setting} is for a tls:// scheduler: give --scheduler tls://HOST:PORT")
        if given and len(given) < 3:
            missing = next(name for name in tls if name not in given)
            raise SettingError(missing, "a tls:// scheduler needs {setting} too: give --tls-ca-file, --tls-cert "
                                        "and --tls-key, as dask worker takes them")
        for name in given:
            if not os.path.isfile(tls[name]):
                raise SettingError(name, f"{{setting}} {tls[name]} is not a file: give the path of Dask's PEM file")

    def security(self):
        """Dask's Security for the client: these certificates, or (None) Dask's own configuration."""
        if self.tls_ca_file is None:
            return None
        from distributed.security import Security

        return Security(tls_ca_file=self.tls_ca_file, tls_client_cert=self.tls_cert, tls_client_key=self.tls_key,
                        require_encryption=True)

    def trial_settings(self):
        return self.fixed | {"data": self.data_path(), "val": self.val, "epochs": self.epochs, "seed": self.seed,
                             "backend": self.backend}

    def data_path(self):
        """The dataset's absolute path, which every worker reads: a sweep never downloads, since each
        worker would."""
        path = self.data if self.data is not None else str(data.default_data_path())
        data.find_dataset(path)  # DataError, one line, when there is none
        return os.path.abspath(path)


def _dask_tls_configured():
    import dask

    return bool(dask.config.get("distributed.comm.tls.ca-file", None))


def hidden_password(url):
    """The storage URL as it may be shown: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a URL SQLAlchemy can parse: show its scheme only)
        return url.split("://", 1)[0] + "://..."


def sweep(config, log=print):
    """Run the sweep `config` describes; returns the summary that sweep.json holds."""
    try:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError as exc:
        raise FastnetError(f"fastnet sweep needs {exc.name}, which is not installed: pip install 'fastnet[sweep]'") \
            from None
    database_errors = (SQLAlchemyError, optuna.exceptions.StorageInternalError)  # Optuna wraps some of the first
    space = config.check()
    out = config.out or os.path.join("sweeps", datetime.now().strftime("%Y%m%d-%H%M%S"))
    created = not os.path.exists(out)
    make_sweep_folder(out)
    url = config.storage or f"sqlite:///{os.path.abspath(os.path.join(out, 'study.db'))}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep reports what goes wrong itself
    with contextlib.ExitStack() as stack:
        try:
            store = _open(url)
            client = stack.enter_context(cluster(config))
            study = optuna.create_study(study_name=config.study, storage=store, direction="maximize",
                                        load_if_exists=True)  # the trials sample and prune, not this study
        except (FastnetError, *database_errors, ImportError) as exc:
            if created:
                shutil.rmtree(out, ignore_errors=True)  # nothing was recorded: leave nothing behind
            if isinstance(exc, FastnetError):
                raise
            raise FastnetError(_cannot_open(url, exc)) from None
        me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        job = {"study": config.study, "storage": url, "space": space, "fixed": config.trial_settings(),
               "trials_dir": os.path.abspath(os.path.join(out, "trials")), "threads": config.threads_per_trial,
               "pruner": config.pruner, "trials": config.trials, "seed": config.seed, "sweep": me}
        capacity = sum(client.nthreads().values())  # trials that run at once: a worker thread each
        log(f"sweep {config.study} in {hidden_password(url)}: {config.trials} trials of {len(space.settings)} settings "
            f"({', '.join(space.settings)}), {_plural(capacity, 'worker')} x "
            f"{_plural(config.threads_per_trial, 'thread')}")
        try:
            drive(study, store, client, job, config, capacity, log)
        except database_errors as exc:
            raise DatabaseLost(f"lost the study's database {hidden_password(url)} mid-sweep ({_cause(exc)}): "
                               f"what it recorded is kept; when it is back, the same command continues the "
                               f"study") from None
        except StorageError:  # a trial's; the results would not be written either
            _stop_every_trial(study, store, me, "stopped: another trial could not write its files", stack)
            raise
        except KeyboardInterrupt:
            stopped = _stop_every_trial(study, store, me, "stopped by Ctrl-C", stack)
            summary = write_results(study, config, space, out, url)
            raise Interrupted(signal.SIGINT, f"sweep stopped by Ctrl-C: {len(stopped)} running trials marked "
                                             f"stopped, {_finished(summary)} of {config.trials} done; the same "
                                             f"command continues the study") from None
    return write_results(study, config, space, out, url)


def make_sweep_folder(out):
    """The sweep folder `out` and its trials/, or the error that says why they cannot be made."""
    try:
        os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    except OSError as exc:
        raise storage.unwritable_out(out, out, exc) from exc


def _open(url, attempts=3):
    """The study's storage: connects, and gives a new database Optuna's tables. Two sweeps started
    at once on a new database both create them, and one of the two is refused: it tries again."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(attempts):
        try:
            return trials.storage(url)
        except IntegrityError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


def _cannot_open(url, exc):
    shown = hidden_password(url)
    if isinstance(exc, ImportError):  # Optuna's, whose cause is the driver's own
        driver = getattr(exc.__cause__, "name", None) or exc.name or "for it"
        return (f"cannot open the study in {shown}: the database driver {driver} is not installed: pip install "
                f"{DRIVERS.get(driver, driver)}")
    return f"cannot open the study in {shown} ({_cause(exc)}): check that the database runs and the URL is right"


def _cause(exc):
    """The name of the database's own error, under Optuna's wrapping."""
    return type(exc.__cause__ or exc).__name__


@contextlib.contextmanager
def cluster(config):
    """A Dask client: of the scheduler at config.scheduler, or of a LocalCluster of config.workers
    processes that run one trial each."""
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler is None:
        # Dask's HTTP server on a free loopback port, and none of its logs: the sweep reports what a
        # trial raised, and a worker's notes on shutting down are not for the user. Nor its statistical
        # profiler, for that dashboard: its history, a profile for every second of work up to 1,000 of
        # them, grew a worker by 0.5 MB per 7-second trial (benchmarks/RESULTS.md). The nannies keep
        # the setting for the workers they restart.
        with _children_started_quietly(), dask.config.set({"distributed.worker.profile.enabled": False}):
            local = LocalCluster(n_workers=config.workers or os.cpu_count(), threads_per_worker=1, processes=True,
                                 dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)
        with local, Client(local) as client:
            yield client
        return
    try:
        client = Client(config.scheduler, security=config.security(), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise FastnetError(f"cannot reach the Dask scheduler at {config.scheduler} ({_reason(exc)}): start it "
                           f"with 'dask scheduler' (docs/sweeps.md) or check the address") from None
    with client:
        if not client.nthreads():
            raise FastnetError(f"the Dask scheduler at {config.scheduler} has no workers: start some with "
                               f"'dask worker {config.scheduler} --nthreads 1'")
        yield client


@contextlib.contextmanager
def _children_started_quietly():
    """Processes started in this block ignore SIGINT: Ctrl-C in a terminal reaches a LocalCluster's
    workers too, and it is for the sweep to stop them and mark their trials. And multiprocessing's
    resource tracker, started here, does not warn at exit about the semaphores of workers that
    closing the cluster had to kill: it removes them all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler, warnings_given = signal.signal(signal.SIGINT, signal.SIG_IGN), os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore:resource_tracker:UserWarning"
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if warnings_given is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = warnings_given


def _reason(exc):
    text = str(exc).split("\n")[0]
    return text if len(text) < 120 else type(exc).__name__


def drive(study, store, client, job, config, capacity, log):
    """Keep up to `capacity` trials running until the study holds config.trials finished ones (all
    sweeps on it counted) or the timeout stops new ones; returns when none of this sweep's run."""
    from distributed import TimeoutError as NotYet
    from distributed import wait

    deadline = time.monotonic() + 60 * config.timeout if config.timeout else None
    running, submitted, failures_in_a_row = set(), 0, 0
    while True:
        _fail_stale(study)
        everything = study.get_trials(deepcopy=False)
        finished = sum(t.state.name in FINISHED for t in everything)
        others = sum(t.state.name == "RUNNING" and t.user_attrs.get("sweep") != job["sweep"] for t in everything)
        starting = deadline is None or time.monotonic() < deadline
        while starting and len(running) < capacity and finished + others + len(running) < config.trials:
            running.add(client.submit(run_trial, job | {"job": f"{job['sweep']}/{submitted}"}, pure=False))
            submitted += 1
        if not running:
            _stop_running(study, store, job["sweep"], "its worker died")  # no job of this sweep runs them
            if starting and others and finished < config.trials:  # other sweeps' trials may end it
                time.sleep(trials.HEARTBEAT)
                continue
            return
        try:
            done, running = wait(running, timeout=trials.HEARTBEAT, return_when="FIRST_COMPLETED")
        except NotYet:
            continue
        for future in done:
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001  (the job's worker died too often: Dask's KilledWorker)
                result = {"number": "?", "state": "FAIL", "error": f"{type(exc).__name__}: {exc}"}
            if result["state"] == "NOT NEEDED":
                continue
            if "storage" in result:  # every trial after it would fail the same way
                raise StorageError(result["storage"], f"run the same command again: it continues the study, "
                                                      f"and tries the settings of trial {result['number']} again")
            failures_in_a_row = failures_in_a_row + 1 if result["state"] == "FAIL" else 0
            log(_progress(study, len(running), result))
            if failures_in_a_row >= max(config.trials, 3):
                raise FastnetError(f"the last {failures_in_a_row} trials all failed, the last with: "
                                   f"{result.get('error')}; fix the fixed settings or the space")


def _fail_stale(study):
    """Optuna's check for running trials whose heartbeats stopped: failed, and queued again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _plural(number, thing):
    return f"{number} {thing}{'s' * (number != 1)}"


def _stop_every_trial(study, store, sweep_id, why, cluster):
    """Mark this sweep's running trials stopped and close its `cluster` (an ExitStack); returns
    their numbers. Marked first, so that a trial that would finish while its worker shuts down
    cannot (the study refuses to change a finished trial); and again after, for trials asked
    meanwhile."""
    stopped = _stop_running(study, store, sweep_id, why)
    cluster.close()
    return stopped + _stop_running(study, store, sweep_id, why)


def _stop_running(study, store, sweep_id, why):
    """Mark the running trials of this sweep stopped; returns their numbers."""
    return [t.number for t in _running(study, sweep_id) if trials.stop(store, study.study_name, t.number, why)]


def _running(study, sweep_id):
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
            and t.user_attrs.get("sweep") == sweep_id]


def _finished(summary):
    return summary["trials"]["COMPLETE"] + summary["trials"]["PRUNED"]


def _progress(study, running, result):
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state.name == state for t in trials) for state in ("COMPLETE", "PRUNED", "FAIL")}
    line = (f"trial {result['number']} {result['state'].lower()}; {counts['COMPLETE'] + counts['PRUNED']} done "
            f"({counts['PRUNED']} pruned, {counts['FAIL']} failed), {running} running")
    if counts["COMPLETE"]:
        best = study.best_trial
        line += f"; best val {best.value:.2%} (trial {best.number}: {_settings_text(best.user_attrs['settings'])})"
    return line


def _settings_text(settings):
    return ", ".join(f"{name}={_flag_value(value)}" for name, value in settings.items())


def _flag_value(value):
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def reproduce_command(config, trial_settings):
    """The fastnet train command that repeats a trial: its fixed and drawn settings, the sweep's
    data, split, epochs and seed, and its thread count, so that the numbers come out the same."""
    settings = config.trial_settings() | trial_settings
    words = ["fastnet", "train"]
    for name, value in settings.items():
        if value is None and name in ("data", "backend"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, _flag_value(value)]
    return " ".join(words + ["--threads", str(config.threads_per_trial)])


def write_results(study, config, space, out, url):
    """trials.csv and sweep.json in the sweep folder, from the study itself; returns the summary."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [{"number": t.number, "state": t.state.name, "val_acc": t.value if t.value is not None else "",
             "epochs": max(t.intermediate_values, default=0), "out": t.user_attrs.get("out", "")}
            | {name: _flag_value(t.user_attrs.get("settings", {}).get(name)) for name in space.settings}
            | {"note": _note(t)}
            for t in trials]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["number", "state", "val_acc", "epochs", *space.settings, "out", "note"])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomically(os.path.join(out, "trials.csv"), table.getvalue())
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {"study": config.study, "storage": hidden_password(url), "space": str(space.path),
               "trials": {state: sum(t.state.name == state for t in trials)
                          for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
               "best": None if best is None else {
                   "number": best.number, "val_acc": best.value, "settings": best.user_attrs["settings"],
                   "out": best.user_attrs.get("out"),
                   "command": reproduce_command(config, _from_json(best.user_attrs["settings"]))},
               "config": dataclasses.asdict(config) | {"storage": hidden_password(url)}, "out": out}
    storage.write_text_atomically(os.path.join(out, "sweep.json"), json.dumps(summary, indent=2))
    return summary | {"rows": rows, "settings": list(space.settings)}


def _note(trial):
    """Why a failed trial ended, which trial a retry repeats, and the warnings its run gave."""
    import optuna

    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    origin = trial.user_attrs.get("retry_of", retried)
    if origin is not None:
        notes.append(f"retry of trial {origin}")
    if trial.state.name == "FAIL":
        notes.append(trial.user_attrs.get("error") or trial.user_attrs.get("ended")
                     or "its worker died (its heartbeats stopped)")
    notes += [f"warning: {warning}" for warning in trial.user_attrs.get("warnings", [])]
    return "; ".join(notes)


def _from_json(settings):
    return {name: tuple(value) if isinstance(value, list) else value for name, value in settings.items()}


def format_results(summary):
    names = summary["settings"]
    widths = {name: max(len(name), *(len(str(row[name])) for row in summary["rows"])) for name in names}
    lines = [f"{'trial':>5}  {'state':<8}  {'val':>7}  {'epochs':>6}  " + "  ".join(f"{n:<{widths[n]}}" for n in names)
             + "  note"]
    for row in summary["rows"]:
        value = f"{row['val_acc']:.2%}" if row["val_acc"] != "" else ""
        lines.append((f"{row['number']:>5}  {row['state'].lower():<8}  {value:>7}  {row['epochs']:>6}  "
                      + "  ".join(f"{str(row[n]):<{widths[n]}}" for n in names) + f"  {row['note']}").rstrip())
    counts = summary["trials"]
    lines.append(f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed; results in "
                 f"{summary['out']}/trials.csv and sweep.json")
    if summary["best"]:
        best = summary["best"]
        lines.append(f"best: trial {best['number']}, validation accuracy {best['val_acc']:.2%}; reproduce with:")
        lines.append(f"  {best['command']}")
    return "\n".join(lines)
