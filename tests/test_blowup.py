"""A run that is blowing up says so (fastnet.loss_watch): one warning line after the epoch whose
training loss rose many-fold, naming --lr and --batch-size and what to try, while the run goes on;
none for a run that trains well; no number of the run changed; a resumed run warns as one that never
stopped.

The runs are on conftest's tiny_npy: 300 training images of 3 classes in batches of 30, so a block
of the watch is an epoch's 10 steps and its means are the epochs' training losses."""

import json
import math

import numpy as np
import pytest

from fastnet import checkpoint
from fastnet.config import TrainConfig
from fastnet.loss_watch import LossWatch
from fastnet.run_folder import TIMING_METRICS, resumed_config
from fastnet.train import train
from helpers import fastnet

DOCS = "(see 'When the loss blows up' in docs/recipes.md)"
# Found by trying: (8,8) at 2 on a cosine schedule blows up in its first epoch and stays at a guess's
# loss; (8) at a constant 1 trains to 0.3 in its first epoch, then blows up and goes on, finite.
FIRST_EPOCH = dict(hidden=(8, 8), lr=2.0, schedule="cosine")
AFTER_TRAINING = dict(hidden=(8,), lr=1.0, schedule="constant")


def settings(tiny, **changes):
    return dict(data=str(tiny), epochs=8, batch_size=30) | changes


def flags(values):
    """The fastnet train flags of TrainConfig settings."""
    args = []
    for name, value in values.items():
        args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else value]
    return args


def train_losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_rise(losses, classes=3):
    """(epoch, lowest before it, its loss) of the first epoch whose loss is more than twice the lowest
    so far, counted from a uniform guess's ln(classes) and never from below a tenth of it."""
    lowest = math.log(classes)
    for epoch, loss in enumerate(losses, 1):
        if loss > 2 * max(lowest, 0.1 * math.log(classes)):
            return epoch, lowest, loss
        lowest = min(lowest, loss)
    return None


def warnings_in(lines):
    return [line for line in lines if line.startswith("warning:")]


@pytest.mark.parametrize("blowup", [FIRST_EPOCH, AFTER_TRAINING], ids=["in-the-first-epoch", "after-training"])
def test_a_run_that_blows_up_warns_once_and_goes_on(blowup, tiny_npy, tmp_path):
    result = fastnet("train", *flags(settings(tiny_npy, **blowup, out=tmp_path / "run")))

    assert result.returncode == 0 and result.stderr == "", result.stderr
    rise = first_rise(train_losses(tmp_path / "run"))
    assert rise is not None, "the run did not blow up: the test needs another setting"
    epoch, low, high = rise
    lower = f"{0.05 * 30 / 128:.3g}"  # the defaults' 0.05 per 128 images, scaled to a batch of 30
    expected = (f"warning: the training loss rose {high / low:.3g}-fold in epoch {epoch}, from {low:.3g} to "
                f"{high:.3g} (means over 10 steps): the run is blowing up at --lr {blowup['lr']:g} with --batch-size "
                f"30; lower --lr to {lower} {DOCS}")
    lines = result.stdout.splitlines()
    assert warnings_in(lines) == [expected]  # no batch size to suggest: 2,560 is more than the 300 images
    assert lines[lines.index(expected) - 1].startswith(f"epoch {epoch}/8 ")
    assert len([line for line in lines if line.startswith("epoch ")]) == 8


@pytest.mark.parametrize("batch_size, lr, lower, larger", [(64, 0.05, "0.025", 128), (32, 0.05, "0.0125", 128),
                                                           (128, 0.05, "0.025", 256), (128, 0.01, "0.005", 256)])
def test_the_warning_suggests_half_the_rate_per_image_at_most_the_defaults(batch_size, lr, lower, larger):
    watch = LossWatch.for_run(batch_size, steps_per_epoch=782, classes=10)
    for loss in [1.8] * watch.block + [4.5] * watch.block:
        watch.see(loss)

    line = watch.warning(1, lr, batch_size, train_size=50000)

    assert line == (f"warning: the training loss rose 2.5-fold in epoch 1, from 1.8 to 4.5 (means over {watch.block} "
                    f"steps): the run is blowing up at --lr {lr:g} with --batch-size {batch_size}; lower --lr to "
                    f"{lower} or raise --batch-size to {larger} {DOCS}")
    assert watch.block == round(3200 / batch_size)
    assert watch.warning(2, lr, batch_size, train_size=50000) is None  # once per run


def test_a_run_that_trains_well_gets_no_warning(tiny_npy, tmp_path):
    result = fastnet("train", *flags(settings(tiny_npy, hidden=(8,), out=tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    assert warnings_in(result.stdout.splitlines()) == []
    assert train_losses(tmp_path / "run")[-1] < 0.1


def test_a_rise_far_below_a_guess_loss_is_not_a_blowup(tiny_npy, tmp_path):
    # At a one-cycle peak of 2 the loss of a run that fits the tiny set exactly rises more than 2-fold,
    # from about 3e-4 to 4e-3, all of it below a tenth of ln(3).
    result = fastnet("train", *flags(settings(tiny_npy, hidden=(8,), lr=2.0, out=tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    losses = train_losses(tmp_path / "run")
    assert max(b / min(losses[:i]) for i, b in enumerate(losses) if i) > 2
    assert max(losses[1:]) < 0.1 * math.log(3)
    assert warnings_in(result.stdout.splitlines()) == []


def outcome(run):
    with np.load(run / "checkpoint.npz", allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files if name.startswith(("param_", "optim_"))}
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return arrays, metrics


def test_the_watch_changes_no_number(tiny_npy, tmp_path, monkeypatch):
    config = settings(tiny_npy, **AFTER_TRAINING)
    watched, unwatched = [], []
    train(TrainConfig(**config, out=str(tmp_path / "watched")), log=watched.append)
    monkeypatch.setattr(LossWatch, "see", lambda watch, loss: None)  # the same run, with a watch that sees nothing
    train(TrainConfig(**config, out=str(tmp_path / "unwatched")), log=unwatched.append)

    assert len(warnings_in(watched)) == 1 and warnings_in(unwatched) == []
    arrays, metrics = outcome(tmp_path / "watched")
    expected_arrays, expected_metrics = outcome(tmp_path / "unwatched")
    assert arrays.keys() == expected_arrays.keys()
    assert all(arrays[name].tobytes() == expected_arrays[name].tobytes() for name in arrays)
    assert metrics == expected_metrics


class Crash(Exception):
    pass


@pytest.mark.parametrize("cut_at", ["epoch 1/", "warning:"], ids=["before-the-blowup", "after-the-warning"])
def test_a_resumed_run_warns_as_one_that_never_stopped(cut_at, tiny_npy, tmp_path):
    config = settings(tiny_npy, **AFTER_TRAINING)
    whole = []
    train(TrainConfig(**config, out=str(tmp_path / "whole")), log=whole.append)
    lines = []

    def crash(line):
        lines.append(line)
        if line.startswith(cut_at):
            raise Crash  # after that epoch's checkpoint, as a power cut would

    with pytest.raises(Crash):
        train(TrainConfig(**config, out=str(tmp_path / "cut")), log=crash)
    train(resumed_config(str(tmp_path / "cut")), log=lines.append, resume=True)

    assert len(warnings_in(whole)) == 1
    assert warnings_in(lines) == warnings_in(whole)
    saved = json.loads(str(checkpoint.load(str(tmp_path / "cut" / "checkpoint.npz")).arrays["progress"]))
    assert saved["watch"]["warned"] is True
