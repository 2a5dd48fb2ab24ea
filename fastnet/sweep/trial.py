"""One trial of a sweep, as a Dask worker runs it: ask the study for a trial, train the settings it
draws, report the validation accuracy after every epoch, and tell the study how the trial ended.

Everything a trial needs travels as a small dict (the study's name and storage URL, the fixed
settings, the space file): the data are read by the worker from the path in the settings, never
shipped through the scheduler.
"""

import os

from fastnet import backends
from fastnet.errors import FastnetError
from fastnet.sweep import space as spaces
from fastnet.train import TrainConfig, train


def pruner(name):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


def sampler(seed):
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def run_trial(job):
    """Run one trial of job["study"]; returns {"number", "state", "value", "settings", "out"}.

    job: study, storage, space (a TOML path or None), fixed (TrainConfig settings every trial
    shares), trials_dir, threads, pruner, seed (this job's own, so that parallel jobs draw apart).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job["study"], storage=job["storage"], sampler=sampler(job["seed"]),
                              pruner=pruner(job["pruner"]))
    trial = study.ask()
    drawn = spaces.load(job["space"]).suggest(trial)
    out = os.path.join(job["trials_dir"], f"trial-{trial.number:04d}")
    settings = job["fixed"] | drawn | {"out": out}
    trial.set_user_attr("settings", _jsonable(drawn))
    trial.set_user_attr("out", out)
    pruned = []

    def after_epoch(summary):
        trial.report(summary["val_acc"], summary["epoch"])
        if trial.should_prune():
            pruned.append(summary["epoch"])
            return True  # ends the run after this epoch, its checkpoint and model written
        return False

    try:
        with backends.use_threads(settings.get("backend"), job["threads"]):
            summary = train(TrainConfig(**settings), log=lambda line: None, after_epoch=after_epoch)
    except FastnetError as exc:  # diverged, or a setting this data cannot take: the search goes on
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "value": None, "settings": drawn, "out": out,
                "error": str(exc)}
    value = summary["kept"]["val_acc"]  # the model a run keeps: its best epoch by validation accuracy
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return {"number": trial.number, "state": "PRUNED", "value": value, "settings": drawn, "out": out}
    study.tell(trial, value)
    return {"number": trial.number, "state": "COMPLETE", "value": value, "settings": drawn, "out": out}


def _jsonable(settings):
    return {name: list(value) if isinstance(value, tuple) else value for name, value in settings.items()}
