"""The search space of `fastnet sweep`: read from TOML, checked whole with fastnet train's own rules,
and drawn from through a real Optuna study."""

import math
import zlib

import optuna
import pytest

from fastnet.config import TrainConfig
from fastnet.errors import SpaceError
from fastnet.sweep import space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def draws(loaded, trials=40, seed=0, sampler=optuna.samplers.TPESampler):
    """The settings of `trials` trials of a seeded study over `loaded`."""
    study = optuna.create_study(direction="maximize", sampler=sampler(seed=seed))
    drawn = []

    def objective(trial):
        drawn.append(loaded.suggest(trial))
        return zlib.crc32(repr(sorted(drawn[-1].items())).encode()) % 97  # any fixed score: TPE needs one

    study.optimize(objective, n_trials=trials)
    return drawn


def test_the_default_space_is_valid_and_every_draw_is_a_run_fastnet_train_accepts():
    loaded = space.load()
    assert loaded.path == space.DEFAULT_SPACE and len(loaded.settings) >= 8
    assert not set(loaded.settings) & set(space.FIXED)
    for settings in draws(loaded):
        TrainConfig(**settings).check()  # raises on anything fastnet train would refuse
        assert isinstance(settings["hidden"], tuple) and settings["norm"] in (None, "layernorm")


def test_each_kind_of_dimension_stays_in_its_range(tmp_path):
    loaded = space.load(write(tmp_path, """
[lr]
low = 0.001
high = 0.1
log = true

[dropout]
low = 0.0
high = 0.5

[translate]
low = 0
high = 4
step = 2

[optimizer]
choices = ["sgd", "adamw"]

[hidden]
choices = ["64", [32, 32]]
"""))
    drawn = draws(loaded, trials=60)
    lrs = [d["lr"] for d in draws(loaded, trials=200, sampler=optuna.samplers.RandomSampler)]
    assert all(0.001 <= lr <= 0.1 for lr in lrs + [d["lr"] for d in drawn])
    # Drawn independently, a log scale puts half the draws below the geometric middle (0.01), where
    # a linear one would put one in eleven: 200 draws stay within 4 standard deviations of a half.
    assert 0.35 < sum(lr < 0.01 for lr in lrs) / len(lrs) < 0.65
    assert all(0.0 <= d["dropout"] <= 0.5 for d in drawn)
    assert {d["translate"] for d in drawn} <= {0, 2, 4} and all(isinstance(d["translate"], int) for d in drawn)
    assert {d["optimizer"] for d in drawn} == {"sgd", "adamw"}
    assert {d["hidden"] for d in drawn} == {(64,), (32, 32)}
    assert [type(d) for d in loaded.dimensions] == [space.Range, space.Range, space.Range, space.Choice,
                                                    space.Choice]


def test_the_same_seed_draws_the_same_trials():
    loaded = space.load()
    assert draws(loaded, trials=15, seed=3) == draws(loaded, trials=15, seed=3)
    assert draws(loaded, trials=15, seed=3) != draws(loaded, trials=15, seed=4)


@pytest.mark.parametrize("text, phrases", [
    ("[lrr]\nlow = 0.1\nhigh = 0.2", ["[lrr] is not a fastnet train setting: did you mean [lr]?"]),
    ("[epochs]\nlow = 1\nhigh = 9", ["[epochs] is fixed for every trial", "--epochs"]),
    ("[val]\nchoices = [100]", ["[val] is fixed", "--val"]),
    ("[lr]\nlow = 0.2\nhigh = 0.1", ["[lr] is an empty range (low 0.2, high 0.1)", "make low less than high"]),
    ("[lr]\nlow = 0.1\nhigh = 0.1", ["empty range"]),
    ("[lr]\nlow = 0.0\nhigh = 0.1\nlog = true", ["log = true but low 0.0", "above 0"]),
    ("[lr]\nlow = -0.1\nhigh = 0.1", ["-0.1 is not a value fastnet train takes", "lr must be a positive number"]),
    ("[dropout]\nlow = 0.0\nhigh = 1.5", ["1.5 is not a value", "dropout is a rate in [0, 1)"]),
    ("[translate]\nlow = 0\nhigh = 2.5", ["takes whole numbers, got 2.5"]),
    ("[translate]\nlow = 0\nhigh = 4\nstep = 0", ["step 0 is for integer ranges"]),
    ("[lr]\nlow = 0.01\nhigh = 0.1\nstep = 2", ["step 2 is for integer ranges"]),
    ("[optimizer]\nlow = 1\nhigh = 2", ["not a number, so it cannot be a range", "choices"]),
    ("[optimizer]\nchoices = [\"sgd\", \"lbfgs\"]", ["'lbfgs' is not a value", "unknown optimizer 'lbfgs'"]),
    ("[optimizer]\nchoices = []", ["has no choices"]),
    ("[optimizer]\nchoices = [\"sgd\", \"sgd\"]", ["lists a choice twice"]),
    ("[lr]\nchoices = [0.1]\nlow = 0.1", ["has choices and low", "either a choice or a range"]),
    ("[lr]\nhigh = 0.1", ["a range needs low and high"]),
    ("[hidden]\nchoices = [\"512,0\"]", ["is not a value fastnet train takes", "hidden must be"]),
    ("[flip]\nchoices = [\"yes\"]", ["'yes' is not true or false"]),
    ("lr = 0.1", ["[lr] must be a table of its own"]),
    ("", ["varies nothing"]),
    ("[lr\nlow = 1", ["is not valid TOML"]),
])
def test_a_bad_space_is_one_error_naming_the_file_and_the_setting(tmp_path, text, phrases):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as refused:
        space.load(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_a_missing_space_file_says_how_to_use_the_default(tmp_path):
    with pytest.raises(SpaceError, match=r"does not exist: pass a TOML file, or leave --space out"):
        space.load(tmp_path / "nowhere.toml")


def test_a_range_describes_itself_as_the_file_says_it():
    assert space.Range("lr", 0.005, 0.2, log=True).describe() == "lr: 0.005 to 0.2, log scale"
    assert space.Choice("norm", ("none", "layernorm")).describe() == "norm: one of none, layernorm"
    assert math.isclose(space.load().dimensions[0].low, 0.005)
