"""The driver of `fastnet sweep`: check everything, open the study, keep the Dask workers busy with
trials until the study holds the trials asked for, then write the results.

The study lives in Optuna's RDB storage (an SQLite file in the sweep folder unless --storage says
otherwise), so the driver counts finished trials there: run again, the same command continues the
same study up to its number of trials in all. A trial that fails (it diverged, or a worker died) is
recorded as failed and another trial takes its place.
"""

import csv
import dataclasses
import json
import os
import shutil
import time
from datetime import datetime

from fastnet import data
from fastnet import settings as rules
from fastnet.errors import FastnetError, SettingError
from fastnet.sweep import space as spaces
from fastnet.sweep.trial import pruner, run_trial, sampler
from fastnet.train import TrainConfig

PRUNERS = ("median", "hyperband", "none")
FINISHED = ("COMPLETE", "PRUNED")


@dataclasses.dataclass
class SweepConfig:
    data: str | None = None
    space: str | None = None          # a TOML file; None: fastnet's default space
    trials: int = 20                  # finished (complete or pruned) trials the study ends with
    timeout: float | None = None      # minutes; no new trial starts after it
    workers: int | None = None        # Dask worker processes on this machine; None: one per core
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

    def trial_settings(self):
        return self.fixed | {"data": self.data_path(), "val": self.val, "epochs": self.epochs, "seed": self.seed,
                             "backend": self.backend}

    def data_path(self):
        """The dataset's absolute path, which every worker reads: a sweep never downloads, since each
        worker would."""
        path = self.data if self.data is not None else str(data.default_data_path())
        data.find_dataset(path)  # DataError, one line, when there is none
        return os.path.abspath(path)


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
        from distributed import Client, LocalCluster, wait
    except ImportError as exc:
        raise FastnetError(f"fastnet sweep needs {exc.name}, which is not installed: pip install 'fastnet[sweep]'") \
            from None
    space = config.check()
    out = config.out or os.path.join("sweeps", datetime.now().strftime("%Y%m%d-%H%M%S"))
    created = not os.path.exists(out)
    os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    storage = config.storage or f"sqlite:///{os.path.abspath(os.path.join(out, 'study.db'))}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=config.study, storage=storage, direction="maximize",
                                    load_if_exists=True, sampler=sampler(config.seed), pruner=pruner(config.pruner))
    except Exception as exc:  # noqa: BLE001  (SQLAlchemy's and the drivers' many kinds of failure)
        if created:
            shutil.rmtree(out, ignore_errors=True)  # nothing was recorded: leave nothing behind
        raise FastnetError(f"cannot open the study in {hidden_password(storage)} ({type(exc).__name__}): check "
                           f"that the database runs and the URL is right") from None
    workers = config.workers or os.cpu_count()
    job = {"study": config.study, "storage": storage, "space": str(space.path), "fixed": config.trial_settings(),
           "trials_dir": os.path.abspath(os.path.join(out, "trials")), "threads": config.threads_per_trial,
           "pruner": config.pruner}
    deadline = time.monotonic() + 60 * config.timeout if config.timeout else None
    log(f"sweep {config.study} in {hidden_password(storage)}: {config.trials} trials of {len(space.settings)} "
        f"settings ({', '.join(space.settings)}), {workers} workers x {config.threads_per_trial} threads")
    failures_in_a_row, submitted = 0, len(study.trials)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        running = set()
        while True:
            finished = _count(study, FINISHED)
            while (len(running) < workers and finished + len(running) < config.trials
                   and (deadline is None or time.monotonic() < deadline)):
                running.add(client.submit(run_trial, job | {"seed": config.seed * 100_003 + submitted}, pure=False))
                submitted += 1
            if not running:
                break
            done, running = wait(running, return_when="FIRST_COMPLETED")
            for future in done:
                result = future.result()
                failures_in_a_row = failures_in_a_row + 1 if result["state"] == "FAIL" else 0
                log(_progress(study, len(running), result))
            if failures_in_a_row >= max(config.trials, 3):
                raise FastnetError(f"the last {failures_in_a_row} trials all failed, the last with: "
                                   f"{result.get('error')}; fix the fixed settings or the space")
    return write_results(study, config, space, out, storage)


def _count(study, states):
    return sum(trial.state.name in states for trial in study.get_trials(deepcopy=False))


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


def write_results(study, config, space, out, storage):
    """trials.csv and sweep.json in the sweep folder, from the study itself; returns the summary."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [{"number": t.number, "state": t.state.name, "val_acc": t.value if t.value is not None else "",
             "epochs": max(t.intermediate_values, default=0), "out": t.user_attrs.get("out", "")}
            | {name: _flag_value(t.user_attrs.get("settings", {}).get(name)) for name in space.settings}
            for t in trials]
    with open(os.path.join(out, "trials.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["number", "state", "val_acc", "epochs", *space.settings, "out"])
        writer.writeheader()
        writer.writerows(rows)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {"study": config.study, "storage": hidden_password(storage), "space": str(space.path),
               "trials": {state: sum(t.state.name == state for t in trials)
                          for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
               "best": None if best is None else {
                   "number": best.number, "val_acc": best.value, "settings": best.user_attrs["settings"],
                   "out": best.user_attrs.get("out"),
                   "command": reproduce_command(config, _from_json(best.user_attrs["settings"]))},
               "config": dataclasses.asdict(config) | {"storage": hidden_password(storage)}, "out": out}
    with open(os.path.join(out, "sweep.json"), "w") as file:
        json.dump(summary, file, indent=2)
    return summary | {"rows": rows, "settings": list(space.settings)}


def _from_json(settings):
    return {name: tuple(value) if isinstance(value, list) else value for name, value in settings.items()}


def format_results(summary):
    names = summary["settings"]
    widths = {name: max(len(name), *(len(str(row[name])) for row in summary["rows"])) for name in names}
    lines = [f"{'trial':>5}  {'state':<8}  {'val':>7}  {'epochs':>6}  " + "  ".join(f"{n:<{widths[n]}}" for n in names)]
    for row in summary["rows"]:
        value = f"{row['val_acc']:.2%}" if row["val_acc"] != "" else ""
        lines.append(f"{row['number']:>5}  {row['state'].lower():<8}  {value:>7}  {row['epochs']:>6}  "
                     + "  ".join(f"{str(row[n]):<{widths[n]}}" for n in names))
    counts = summary["trials"]
    lines.append(f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed; results in "
                 f"{summary['out']}/trials.csv and sweep.json")
    if summary["best"]:
        best = summary["best"]
        lines.append(f"best: trial {best['number']}, validation accuracy {best['val_acc']:.2%}; reproduce with:")
        lines.append(f"  {best['command']}")
    return "\n".join(lines)
