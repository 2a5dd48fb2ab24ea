"""One validation layer: each setting's rule is written once (fastnet.settings), TrainConfig.check and
the class that takes the setting apply the same rule with the same message, and every broken rule is a
SettingError that names the setting as its reader spells it."""

from types import SimpleNamespace

import pytest

from fastnet import precision
from fastnet.averaging import WeightAverage
from fastnet.config import TrainConfig
from fastnet.data import Augmentation
from fastnet.errors import FastnetError, SettingError
from fastnet.model import MLP
from fastnet.optim import Optimizer, Schedule
from fastnet.predict import Model
from helpers import assert_one_line_error, fastnet


def model_evaluated_with(tta):
    """fastnet.load's Model of a run, asked for test-time augmentation `tta`: it judges `tta` before it
    uses the network, so a stand-in for the saved run is enough."""
    return Model(SimpleNamespace(net=None, trained_net=None, projection=None, config={}), tta)


# setting, a value no run can use, the start of the message, and the same setting given straight to
# the class that owns it (None: only a run has it).
RULES = [
    ("epochs", 0, "must be a positive integer, got 0", None),
    ("batch_size", 2.5, "must be a positive integer, got 2.5", None),
    ("hidden", (64, 0), "must be a comma list of positive widths", None),
    ("hidden", ("64", 0), "must be a comma list of positive widths, got ('64', 0)", None),  # text, from a file
    ("lr", float("nan"), "must be a positive number, got nan", lambda v: Schedule("constant", v, 10)),
    ("warmup", 1.0, "is a fraction of the run in [0, 1), got 1.0", lambda v: Schedule("onecycle", 0.1, 10, v)),
    ("schedule", "linear", "'linear': choose one of constant, step", lambda v: Schedule(v, 0.1, 10)),
    ("optimizer", "rmsprop", "'rmsprop': choose one of sgd", lambda v: Optimizer([], v)),
    ("momentum", 1.0, "must be in [0, 1), got 1.0", lambda v: Optimizer([], "momentum", momentum=v)),
    ("weight_decay", -1e-4, "must be 0 or more, got -0.0001", lambda v: Optimizer([], weight_decay=v)),
    ("activation", "swish", "'swish': choose one of relu", lambda v: MLP([3, 2], activation=v)),
    ("dropout", 1.0, "is a rate in [0, 1), got 1.0", lambda v: MLP([3, 2], dropout=v)),
    ("norm", "batchnorm", "'batchnorm': choose layernorm, or None", lambda v: MLP([3, 2], norm=v)),
    # A run may ask for "auto" (fastnet.precision); a network is built in the precision that decided.
    ("precision", "fp16", "'fp16': choose one of fp32, bf16, auto", lambda v: precision.check(v)),
    ("label_smoothing", -0.1, "must be in [0, 1), got -0.1",
     lambda v: MLP([3, 2]).loss_and_grads([[0.0, 0.0, 0.0]], [0], label_smoothing=v)),
    ("translate", -1, "is a size in pixels, got -1", lambda v: Augmentation((4, 4, 3), translate=v)),
    ("cutout", -2, "is a size in pixels, got -2", lambda v: Augmentation((4, 4, 3), cutout=v)),
    ("clip", 0.0, "must be a positive gradient norm, got 0.0", None),
    ("pca", -1, "must be a number of components, got -1: pass one such as 256, or 0 for none", None),
    ("whiten", True, "scales principal components, and this run has none: add --pca K", None),
    ("tta", "crop", "'crop' is not a test-time augmentation: choose flip, flip+shift or none", model_evaluated_with),
    ("val", -5, "must be 0 or more, got -5", None),
    ("checkpoint_every", 0, "must be a positive integer, got 0", None),
    ("seed", -1, "must be an integer 0 or more, got -1: pass one such as 0", None),
    ("ema", 1.0, "is a decay per step, in (0, 1), got 1.0: pass one such as 0.9998",
     lambda v: WeightAverage(MLP([3, 2]), v)),
]


def names_the_setting(error, setting, phrase):
    message = str(error)
    return setting in message and phrase in message and f"--{setting}" not in message


@pytest.mark.parametrize("setting, value, phrase, owner", RULES, ids=[rule[0] for rule in RULES])
def test_a_broken_rule_is_one_setting_error_whoever_applies_it(setting, value, phrase, owner):
    with pytest.raises(SettingError) as from_config:
        TrainConfig(**{setting: value}).check()
    error = from_config.value
    assert error.setting == setting and names_the_setting(error, setting, phrase), str(error)
    assert error.on_command_line().startswith(error.message.split("{setting}")[0])
    assert f"--{setting.replace('_', '-')}" in error.on_command_line() and phrase in error.on_command_line()
    if owner is not None:
        with pytest.raises(SettingError) as from_owner:
            owner(value)
        assert str(from_owner.value) == str(error)  # one rule, one message


def test_a_setting_error_is_what_python_callers_and_the_command_line_expect():
    assert issubclass(SettingError, ValueError) and issubclass(SettingError, FastnetError)
    error = SettingError("label_smoothing", "{setting} must be in [0, 1), got 2: pass one such as 0.1 {not a field}")
    assert str(error) == "label_smoothing must be in [0, 1), got 2: pass one such as 0.1 {not a field}"
    assert error.on_command_line() == "--label-smoothing must be in [0, 1), got 2: pass one such as 0.1 {not a field}"


def test_the_defaults_and_the_edges_of_each_range_are_accepted():
    TrainConfig().check()
    TrainConfig(momentum=0.0, weight_decay=0.0, warmup=0.0, dropout=0.0, label_smoothing=0.0, val=0,
                translate=0, cutout=0, pca=0, clip=1e-3, checkpoint_every=1, epochs=1, batch_size=1,
                hidden=(1,), ema=1e-6).check()
    TrainConfig(ema=1 - 1e-9).check()


def test_none_is_the_command_lines_word_for_no_norm_and_not_the_librarys():
    with pytest.raises(SettingError, match="unknown norm 'none'"):
        MLP([3, 2], norm="none")
    assert MLP([3, 2], norm=None).norm is None


def test_the_command_line_names_the_flag(tmp_path):
    # --label-smoothing has no argparse range: the library's rule is what refuses it.
    assert_one_line_error(fastnet("train", "--data", tmp_path / "missing", "--label-smoothing", "1", cwd=tmp_path),
                          "--label-smoothing must be in [0, 1), got 1.0: pass one such as 0.1")
    assert not list(tmp_path.iterdir())  # refused before the data was looked for or a run folder made


# The rules of --pca, --whiten and --tta were the command line's own once (argparse types, with their
# own words). Now a flag reaches the rule of fastnet.settings that TrainConfig applies, and says what
# the Python API says, in the command line's spelling.
SAME_FROM_BOTH = {
    "pca": (["train", "--pca", "-2"], {"pca": -2}),
    "whiten": (["train", "--whiten"], {"whiten": True}),
    "tta": (["train", "--tta", "crop"], {"tta": "crop"}),
    "evaluate tta": (["evaluate", "run", "--tta", "crop"], {"tta": "crop"}),
    "predict tta": (["predict", "run", "image.png", "--tta", "crop"], {"tta": "crop"}),
}


@pytest.mark.parametrize("name", SAME_FROM_BOTH)
def test_pca_whiten_and_tta_say_the_same_from_python_and_from_the_command_line(name, tmp_path):
    args, chosen = SAME_FROM_BOTH[name]
    with pytest.raises(SettingError) as from_python:
        TrainConfig(**chosen).check()
    data = ["--data", tmp_path / "missing"] if args[0] == "train" else []
    result = fastnet(*args, *data, cwd=tmp_path)
    assert_one_line_error(result)
    assert result.stderr == f"fastnet: error: {from_python.value.on_command_line()}\n"
    assert not list(tmp_path.iterdir())  # refused before any data, model or run folder was looked for


# The rules of the settings that the data limits, which TrainConfig.check_against_data applies once a run
# has its data: here 300 training images of 4x4x3 (of 8x5 where the shape is given), less those --val
# holds out. settings, the setting named, and the whole message as Python reads it.
DATA_RULES = [
    (dict(translate=4), "translate", "translate 4 can shift the 4x4 images wholly out of view: pass at most 3"),
    (dict(translate=5, shape=(8, 5)), "translate",
     "translate 5 can shift the 8x5 images wholly out of view: pass at most 4"),
    (dict(cutout=5), "cutout", "cutout 5 is a square larger than the 4x4 images: pass at most 4"),
    (dict(cutout=6, shape=(8, 5)), "cutout", "cutout 6 is a square larger than the 8x5 images: pass at most 5"),
    (dict(batch_size=301), "batch_size", "batch_size 301 is larger than the 300 training images: pass at most 300"),
    (dict(batch_size=2, val=299), "batch_size",
     ("batch_size 2 is larger than the 1 training image left after 299 are held out for validation: pass at most 1, "
      "or hold out fewer than 299 for validation")),
    (dict(pca=49), "pca", "pca 49 asks for more components than 300 images of 48 inputs can give: pass at most 48"),
    (dict(pca=41, val=260, batch_size=8), "pca",
     ("pca 41 asks for more components than 40 images (those left after 260 are held out for validation) of 48 "
      "inputs can give: pass at most 40, or hold out fewer than 260 for validation")),
]


def data_check(shape=(4, 4, 3), **chosen):
    config = TrainConfig(**chosen)
    config.check_against_data(shape, "npy files in d", 300 - config.val)


@pytest.mark.parametrize("chosen, setting, message", DATA_RULES, ids=[str(rule[0]) for rule in DATA_RULES])
def test_a_setting_the_data_cannot_take_is_one_setting_error_that_says_the_largest_it_can(chosen, setting, message):
    with pytest.raises(SettingError) as refused:
        data_check(**chosen)
    assert refused.value.setting == setting and str(refused.value) == message
    flag = "--" + setting.replace("_", "-")
    assert refused.value.on_command_line() == message.replace(setting, flag, 1)


def test_the_largest_value_a_message_offers_is_accepted():
    data_check(translate=3, cutout=4, batch_size=300, pca=48)
    data_check(shape=(8, 5), translate=4, cutout=5)
    data_check(batch_size=40, pca=40, val=260)


def test_image_flags_on_samples_that_are_not_images_are_refused_before_their_sizes_are_read():
    with pytest.raises(FastnetError, match=r"need images, but the samples of npy files in d have shape \(48,\): drop"):
        data_check(shape=(48,), translate=2, cutout=2)
