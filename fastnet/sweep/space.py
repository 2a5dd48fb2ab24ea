"""A sweep's search space: which `fastnet train` settings vary from trial to trial, and over what.

A space is a TOML file with one table per setting, named as TrainConfig names it:

    [lr]                  a range of floats; log = true draws its logarithm uniformly
    low = 0.005
    high = 0.2
    log = true

    [translate]           a range of integers, when both ends are integers (step: 1 unless given)
    low = 0
    high = 2

    [hidden]              a choice, each value written as the command line writes it
    choices = ["512,512", "1024,1024"]

The space is checked whole when it is read, before any trial runs: every end of a range and every
choice must be a value `fastnet train` accepts for that setting (the rules of fastnet.settings),
and any problem is one SpaceError that names the file, the setting and what to do. Settings that
say where a run reads and writes, or that a sweep fixes for all its trials (FIXED), cannot vary.
"""

import dataclasses
import difflib
import math
import numbers
from pathlib import Path

from fastnet.config import TrainConfig
from fastnet.errors import FastnetError, SpaceError

DEFAULT_SPACE = Path(__file__).with_name("default_space.toml")
# Fixed for every trial of a sweep: the data and folders, the validation split that trials are
# compared on, the epochs that pruning counts, the seed, and what depends on the machine.
FIXED = ("data", "out", "backend", "val", "epochs", "seed", "recipe", "checkpoint_every", "dtype", "precision",
         "eval_every")
BOOLEANS = ("flip", "whiten")
FLOATS = ("lr", "momentum", "weight_decay", "warmup", "dropout", "label_smoothing", "clip", "ema")
INTEGERS = ("batch_size", "translate", "cutout", "pca")
VARIABLE = tuple(field.name for field in dataclasses.fields(TrainConfig) if field.name not in FIXED)


def command_line_value(setting, value):
    """A choice as TrainConfig takes it: widths "512,512" as a tuple, norm and tta "none" as None."""
    if setting == "hidden" and isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else value
    if setting in ("norm", "tta") and value == "none":
        return None
    return value


@dataclasses.dataclass(frozen=True)
class Range:
    setting: str
    low: float
    high: float
    log: bool = False
    step: int | None = None  # integers only

    @property
    def integers(self):
        return self.setting in INTEGERS

    def suggest(self, trial):
        if self.integers:
            return trial.suggest_int(self.setting, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.setting, self.low, self.high, log=self.log)

    def describe(self):
        scale = ", log scale" if self.log else ""
        return f"{self.setting}: {self.low} to {self.high}{scale}"


@dataclasses.dataclass(frozen=True)
class Choice:
    setting: str
    values: tuple  # as the TOML file writes them: what Optuna stores and a person reads

    def suggest(self, trial):
        return command_line_value(self.setting, trial.suggest_categorical(self.setting, list(self.values)))

    def describe(self):
        return f"{self.setting}: one of {', '.join(map(str, self.values))}"


@dataclasses.dataclass(frozen=True)
class Space:
    path: Path
    dimensions: tuple  # Range and Choice, in the file's order

    def suggest(self, trial):
        """The settings of one trial, drawn through an Optuna trial: {setting: value for TrainConfig}."""
        return {dimension.setting: dimension.suggest(trial) for dimension in self.dimensions}

    @property
    def settings(self):
        return tuple(dimension.setting for dimension in self.dimensions)


def load(path=None):
    """The Space in TOML file `path` (None: fastnet's default space), checked whole."""
    path = Path(path) if path is not None else DEFAULT_SPACE
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        tables = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpaceError(f"search space {path} does not exist: pass a TOML file, or leave --space out for "
                         f"fastnet's default space") from None
    except OSError as exc:
        raise SpaceError(f"cannot read search space {path} ({exc.strerror}): check its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpaceError(f"search space {path} is not valid TOML ({exc}): fix the file") from None
    if not tables:
        raise SpaceError(f"search space {path} varies nothing: add a table per setting, e.g. [lr] low = 0.01 "
                         f"high = 0.1")
    return Space(path, tuple(_dimension(path, setting, table) for setting, table in tables.items()))


def _dimension(path, setting, table):
    def refuse(problem):
        return SpaceError(f"search space {path}: [{setting}] {problem}")

    if setting in FIXED:
        raise refuse(f"is fixed for every trial of a sweep: pass it to fastnet sweep as --{setting.replace('_', '-')} "
                     f"instead")
    if setting not in VARIABLE:
        close = difflib.get_close_matches(setting, VARIABLE, n=1)
        hint = f"did you mean [{close[0]}]? " if close else ""
        raise refuse(f"is not a fastnet train setting: {hint}a space varies {', '.join(VARIABLE)}")
    if not isinstance(table, dict):
        raise refuse("must be a table of its own: write [" + setting + "] and below it low/high or choices")
    keys = set(table)
    if "choices" in keys:
        if keys != {"choices"}:
            raise refuse(f"has choices and {', '.join(sorted(keys - {'choices'}))}: a setting is either a choice "
                         f"or a range, not both")
        values = table["choices"]
        if not isinstance(values, list) or not values:
            raise refuse("has no choices: list at least one value, e.g. choices = [...]")
        values = tuple(",".join(map(str, v)) if setting == "hidden" and isinstance(v, list) else v for v in values)
        if len(set(values)) != len(values):
            raise refuse(f"lists a choice twice ({values}): list each value once")
        for value in values:
            _accepted(refuse, setting, command_line_value(setting, value))
        return Choice(setting, values)
    if not {"low", "high"} <= keys or keys - {"low", "high", "log", "step"}:
        raise refuse(f"has {', '.join(sorted(keys)) or 'nothing'}: a range needs low and high (and may have log, "
                     f"and step for integers), a choice needs choices")
    if setting not in FLOATS + INTEGERS:
        raise refuse("is not a number, so it cannot be a range: list its values as choices = [...]")
    low, high, log, step = table["low"], table["high"], table.get("log", False), table.get("step")
    for end in (low, high):
        if isinstance(end, bool) or not isinstance(end, numbers.Real) or not math.isfinite(end):
            raise refuse(f"range ends must be numbers, got {end!r}: write e.g. low = 0.01")
        if setting in INTEGERS and not isinstance(end, int):
            raise refuse(f"takes whole numbers, got {end!r}: write its ends without a decimal point")
    if not low < high:
        raise refuse(f"is an empty range (low {low}, high {high}): make low less than high, or use choices = "
                     f"[{low}] for one value")
    if not isinstance(log, bool):
        raise refuse(f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise refuse(f"has log = true but low {low}: a log scale needs both ends above 0")
    if step is not None and (setting not in INTEGERS or isinstance(step, bool) or not isinstance(step, int)
                             or step < 1 or log):
        raise refuse(f"step {step!r} is for integer ranges without log: give a whole number of 1 or more, or drop it")
    for end in (low, high):
        _accepted(refuse, setting, end)
    return Range(setting, low, high, log, step)


def _accepted(refuse, setting, value):
    """Refuse `value` unless fastnet train accepts it for `setting` (with every other setting at its
    default), saying what fastnet train would say."""
    if setting in BOOLEANS and not isinstance(value, bool):
        raise refuse(f"{value!r} is not true or false: write choices = [true, false]")
    try:
        TrainConfig(**{setting: value}).check()
    except FastnetError as exc:
        raise refuse(f"{value!r} is not a value fastnet train takes ({exc})") from None
    except (TypeError, ValueError) as exc:
        raise refuse(f"{value!r} is not a value fastnet train takes ({exc})") from None
