"""One trial of a sweep, as a Dask worker runs it: ask the study for a trial, train the settings it
draws, report the validation accuracy after every epoch, and tell the study how the trial ended.

Everything a trial needs travels as a small dict (the study's name and storage URL, the fixed
settings, the space): the data are read by the worker from the path in the settings, never
shipped through the scheduler.

When a worker dies mid-trial (kill -9), Dask runs its job again elsewhere, and the new attempt marks
the trial it finds of that job failed and queues its settings to be tried again. Where nobody runs
the job again (a machine lost, a sweep process killed with its cluster), a running trial's heartbeat,
sent to Optuna every HEARTBEAT seconds, stops; after GRACE seconds the sweep marks it failed and
queues its settings again (Optuna's RetryHeartbeatStaleTrialCallback). Whoever stops a trial (the
sweep, on Ctrl-C) marks it in the study; the trial sees that after its epoch and ends.
"""

import functools
import os
import socket
import threading
import warnings

from fastnet import backends
from fastnet.config import TrainConfig
from fastnet.errors import FastnetError, StorageError
from fastnet.train import train

HEARTBEAT = 5  # seconds
GRACE = 20     # seconds without a heartbeat before a running trial counts as dead
RETRIES = 2    # times the settings of a trial whose worker died are tried again


def pruner(name, epochs):
    """Optuna's pruner `name` for trials of `epochs` epochs. The median rule waits for a third of
    the epochs: under the one-cycle schedule the early epochs rank trials poorly (a high peak rate
    trails until the rate comes down), and the validation accuracy of one epoch is noisy."""
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 3)),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


def sampler(seed):
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def storage(url):
    """Optuna's RDB storage of `url`, with the heartbeats that find trials whose worker died. Its
    pool checks each connection before use: a worker keeps it from trial to trial (worker_storage),
    and a connection may have outlived a restart of the database."""
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(RETRIES)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT,
                                          grace_period=GRACE, heartbeat_stale_trial_callback=retry)


@functools.cache
def worker_storage(url):
    """storage(url), made once in a worker process for all the trials it runs. Each storage is a new
    SQLAlchemy engine, and the ORM's caches of compiled statements (100 per table) keep a statement
    of each engine's dialect: with one storage per trial a worker grew by 0.5 MB a CIFAR-10 trial
    (benchmarks/RESULTS.md)."""
    return storage(url)


def trial_id(store, study_name, number):
    """The storage's key of trial `number` of the study."""
    return store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study_name), number)


def stop(store, study_name, number, why):
    """Mark running trial `number` failed, with `why` in its user attributes (the trial itself sees
    it after its epoch); False when it had finished meanwhile."""
    import optuna

    key = trial_id(store, study_name, number)
    try:
        store.set_trial_user_attr(key, "ended", why)
        return store.set_trial_state_values(key, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def run_trial(job):
    """Run one trial of job["study"]; returns {"number", "state", "value", "settings", "out"}.

    job: study, storage (its URL), space (a fastnet.sweep.space.Space), fixed (the TrainConfig
    settings every trial shares), trials_dir, threads, pruner, trials (finished trials the study is
    to have), seed (the sweep's), sweep (the id of the fastnet sweep process that sent it) and job
    (this job's id), both kept with the trial.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep reports what goes wrong itself
    store = worker_storage(job["storage"])
    study = optuna.load_study(study_name=job["study"], storage=store,
                              pruner=pruner(job["pruner"], job["fixed"]["epochs"]))
    for earlier in _attempts(study, job["job"]):  # Dask runs this job again: the worker of the first died
        if stop(store, job["study"], earlier.number, "its worker died"):
            study.enqueue_trial(earlier.params, user_attrs={"retry_of": earlier.number})
    if _taken(study) >= job["trials"]:  # other sweeps on the study started the trials it still needed
        return {"number": None, "state": "NOT NEEDED"}
    with warnings.catch_warnings():  # "heartbeats are for Study.optimize": _beat below does what it would
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        trial = study.ask()
    # Seeded by the sweep's seed and the trial's number, so that no two trials draw alike, whichever
    # sweep process asked, and a rerun of a one-worker sweep draws the same settings.
    study.sampler = sampler(job["seed"] * 100_003 + trial.number)
    key = trial_id(store, job["study"], trial.number)
    if _taken(study, before=trial.number) >= job["trials"]:  # another sweep asked at the same moment, first
        stop(store, job["study"], trial.number, "not needed: other sweeps had started the trials the study needed")
        return {"number": trial.number, "state": "NOT NEEDED"}
    store.record_heartbeat(key)
    beating = threading.Event()
    threading.Thread(target=_beat, args=(store, key, beating), daemon=True).start()
    drawn = job["space"].suggest(trial)
    out = os.path.join(job["trials_dir"], f"trial-{trial.number:04d}")
    settings = job["fixed"] | drawn | {"out": out}
    for name, value in {"sweep": job["sweep"], "job": job["job"], "host": socket.gethostname(), "pid": os.getpid(),
                        "settings": _jsonable(drawn), "out": out}.items():
        trial.set_user_attr(name, value)
    ended = []  # "pruned" or "stopped", after the epoch that decided it

    def after_epoch(summary):
        if store.get_trial(key).state != optuna.trial.TrialState.RUNNING:
            ended.append("stopped")  # by the sweep: the study already says so
            return True
        if "val_acc" not in summary:
            return False
        trial.report(summary["val_acc"], summary["epoch"])
        if trial.should_prune():
            ended.append("pruned")
            return True  # ends the run after this epoch, its checkpoint and model written
        return False

    said = []  # the run's warnings: a trial's log lines are shown nowhere, so its row in trials.csv notes these

    def log(line):
        if line.startswith("warning: "):
            said.append(line.removeprefix("warning: "))
            trial.set_user_attr("warnings", said)  # at once: the trial may fail, or its worker die, before it ends

    result = {"number": trial.number, "settings": drawn, "out": out}
    try:
        with backends.use_threads(settings.get("backend"), job["threads"]):
            summary = train(TrainConfig(**settings), log=log, after_epoch=after_epoch)
    except StorageError as exc:  # not the settings' fault: they are tried again, once the sweep's driver stops
        trial.set_user_attr("error", exc.problem)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return result | {"state": "FAIL", "value": None, "error": exc.problem, "storage": exc.problem}
    except FastnetError as exc:  # diverged, or a setting this data cannot take: the search goes on
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return result | {"state": "FAIL", "value": None, "error": str(exc)}
    finally:
        beating.set()
    value = summary["kept"]["val_acc"]  # the model a run keeps: its best epoch by validation accuracy
    if ended == ["stopped"]:
        return result | {"state": "STOPPED", "value": value}
    if ended == ["pruned"]:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return result | {"state": "PRUNED", "value": value}
    study.tell(trial, value)
    return result | {"state": "COMPLETE", "value": value}


def _attempts(study, job_id):
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("job") == job_id]


def _taken(study, before=None):
    """Trials finished or running, by any sweep on the study; with `before`, only those of lower
    numbers, which were asked for first."""
    import optuna

    states = optuna.trial.TrialState
    taken = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.RUNNING))
    return sum(before is None or t.number < before for t in taken)


def _beat(store, key, stopped):
    while not stopped.wait(HEARTBEAT):
        store.record_heartbeat(key)


def _jsonable(settings):
    return {name: list(value) if isinstance(value, tuple) else value for name, value in settings.items()}
