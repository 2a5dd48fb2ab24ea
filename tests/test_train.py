"""The trainer, in process: learning on real images, determinism, and what a run writes."""

import json

import numpy as np
import pytest

from fastnet import checkpoint, data, report
from fastnet.config import TrainConfig
from fastnet.errors import FastnetError
from fastnet.evaluation import normalizer
from fastnet.run_folder import TIMING_METRICS
from fastnet.train import TrainingRun, train
from helpers import fastnet

METRIC_FIELDS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                 "samples_per_second"}


def quiet_train(**settings):
    return train(TrainConfig(**settings), log=lambda line: None)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cifar
def test_learns_real_cifar_well_above_chance(cifar_subset, tmp_path):
    summary = quiet_train(data=str(cifar_subset), epochs=4, hidden=(256,), lr=0.02, out=str(tmp_path))
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 4
    # 10 classes: chance is 10 %. 4,000 images and 4 epochs reach about 35 %.
    assert summary["test_acc"] > 0.28
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_a_run_writes_config_metrics_and_model(tiny_npy, tmp_path):
    quiet_train(data=str(tiny_npy), epochs=3, hidden=(16,), batch_size=32, val=60, out=str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sizes"] == [48, 16, 3] and config["train_size"] == 240 and config["backend"] == "numpy"
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert METRIC_FIELDS | {"val_loss", "val_acc"} <= set(m)
        assert m["samples_per_second"] == pytest.approx(240 / m["epoch_seconds"])
    assert metrics[-1]["test_acc"] > 0.9  # the synthetic classes are easy to tell apart
    with np.load(tmp_path / "model.npz", allow_pickle=False) as saved:
        assert {"param_0", "param_3", "mean", "std", "class_names", "config"} <= set(saved.files)
        assert saved["mean"].shape == (3,) and saved["param_0"].dtype == np.float32


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_npy, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        quiet_train(data=str(tiny_npy), epochs=2, hidden=(8,), batch_size=16, seed=seed, val=30,
                    out=str(tmp_path / name))
        params = checkpoint.load(str(tmp_path / name / "model.npz")).net.params
        losses = [m["train_loss"] for m in read_metrics(tmp_path / name)]
        runs[name] = (params, losses)
    assert all(np.array_equal(p, q) for p, q in zip(runs["a"][0], runs["b"][0], strict=True))
    assert runs["a"][1] == runs["b"][1]
    assert not np.array_equal(runs["a"][0][0], runs["c"][0][0])


def test_saved_model_reproduces_the_reported_test_accuracy(tiny_npy, tmp_path):
    from fastnet import data
    from fastnet.evaluation import evaluate

    summary = quiet_train(data=str(tiny_npy), epochs=2, hidden=(8,), batch_size=16, out=str(tmp_path))
    saved = checkpoint.load(str(tmp_path / "model.npz"))
    dataset = data.load_dataset(tiny_npy)
    shift, scale = normalizer(saved.mean, saved.std, dataset.input_size, np.uint8, np.float32)
    result = evaluate(saved.net, dataset.test_images, dataset.test_labels, shift, scale)
    assert result.accuracy == summary["test_acc"]


def test_normalizer_standardises_each_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 2, 2, 3), dtype=np.uint8)
    unit = images / 255.0
    mean, std = unit.mean(axis=(0, 1, 2)), unit.std(axis=(0, 1, 2))
    shift, scale = normalizer(mean, std, 12, np.uint8, np.float32)
    standardised = ((images.reshape(50, 12) - shift) * scale).reshape(50, 2, 2, 3)
    np.testing.assert_allclose(standardised.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(axis=(0, 1, 2)), 1, atol=1e-5)
    assert shift.dtype == scale.dtype == np.float32


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": -3}, "batch_size must be a positive integer"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"hidden": (4, 0)}, "hidden must be a comma list"),
    ({"batch_size": 1000}, "batch_size 1000 is larger than the 300 training images: pass at most 300"),
    ({"batch_size": 64, "val": 250}, "batch_size 64 is larger than the 50 training images left after 250 are held"),
    ({"translate": 4}, "translate 4 can shift the 4x4 images wholly out of view: pass at most 3"),
    ({"cutout": 5}, "cutout 5 is a square larger than the 4x4 images: pass at most 4"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ({"pca": -1}, "pca must be a number of components"),
    ({"pca": 49}, "pca 49 asks for more components than 300 images of 48 inputs can give: pass at most 48"),
    ({"pca": 45, "val": 260, "batch_size": 8}, r"pca 45 asks .* than 40 images \(those left after 260 are held out"),
    ({"whiten": True}, "whiten scales principal components, and this run has none: add --pca K"),
    ({"tta": "crop"}, r"tta 'crop' is not a test-time augmentation: choose flip, flip\+shift or none"),
])
def test_impossible_settings_are_refused(tiny_npy, tmp_path, settings, message):
    with pytest.raises(FastnetError, match=message):
        quiet_train(data=str(tiny_npy), out=str(tmp_path), **settings)


def test_divergence_stops_the_run(tiny_npy, tmp_path):
    with pytest.raises(FastnetError, match="diverged at epoch 1"):
        quiet_train(data=str(tiny_npy), epochs=1, hidden=(8,), lr=1e30, optimizer="sgd",
                    schedule="constant", out=str(tmp_path))


# --- Regularised runs, recipes and keeping the best epoch ------------------------------------------

REGULARISED = dict(activation="gelu", norm="layernorm", dropout=0.2, label_smoothing=0.1, flip=True,
                   translate=1, cutout=2, clip=1.0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_regularised_run_is_deterministic_and_its_model_reloads(backend, tiny_npy, tmp_path):
    from fastnet import data
    from fastnet.evaluation import evaluate

    for name in ("a", "b"):
        quiet_train(data=str(tiny_npy), backend=backend, epochs=2, hidden=(16, 8), batch_size=32, seed=1,
                    out=str(tmp_path / name), **REGULARISED)
    a, b = (checkpoint.load(str(tmp_path / name / "model.npz"), backend=backend) for name in "ab")
    assert all(np.array_equal(p, q) for p, q in zip(a.net.params, b.net.params, strict=True))
    assert a.net.spec() == {"activation": "gelu", "norm": "layernorm", "dropout": 0.2}
    # The reloaded model (layer norm gains included) gives the accuracy the run reported.
    dataset = data.load_dataset(tiny_npy)
    shift, scale = normalizer(a.mean, a.std, dataset.input_size, np.uint8, np.float32)
    reported = read_metrics(tmp_path / "a")[-1]["test_acc"]
    assert evaluate(a.net, dataset.test_images, dataset.test_labels, shift, scale).accuracy == reported
    # And the regularisers change the numbers: a plain run of the same seed ends elsewhere.
    quiet_train(data=str(tiny_npy), backend=backend, epochs=2, hidden=(16, 8), batch_size=32, seed=1,
                out=str(tmp_path / "plain"))
    assert read_metrics(tmp_path / "plain")[-1]["train_loss"] != read_metrics(tmp_path / "a")[-1]["train_loss"]


def test_model_npz_keeps_the_epoch_with_the_best_validation_accuracy(tiny_npy, tmp_path):
    from fastnet.run_folder import best_epoch

    summary = quiet_train(data=str(tiny_npy), epochs=6, hidden=(4,), batch_size=16, lr=0.5, val=100, seed=2,
                          schedule="constant", out=str(tmp_path))
    metrics = read_metrics(tmp_path)
    best = max(metrics, key=lambda m: m["val_acc"])["epoch"]  # the first of equals, as model.npz keeps
    assert best < len(metrics)  # so keeping the last epoch would fail this test
    assert best_epoch(metrics) == best == summary["kept"]["epoch"]
    with np.load(tmp_path / "model.npz", allow_pickle=False) as saved:
        assert int(saved["epoch"]) == best
    without_val = quiet_train(data=str(tiny_npy), epochs=3, hidden=(4,), out=str(tmp_path / "plain"))
    assert without_val["kept"]["epoch"] == 3


def test_eval_every_evaluates_those_epochs_and_the_last_and_keeps_the_best_of_them(tiny_npy, tmp_path):
    from fastnet.run_folder import best_epoch

    summary = quiet_train(data=str(tiny_npy), epochs=5, eval_every=2, hidden=(4,), batch_size=16, lr=0.5,
                          val=100, seed=2, schedule="constant", tta="flip", out=str(tmp_path))
    metrics = read_metrics(tmp_path)
    evaluated = [m["epoch"] for m in metrics if {"test_acc", "val_acc", "tta"} <= set(m)]
    assert evaluated == [2, 4, 5]
    assert all({"test_acc", "val_acc", "test_loss", "val_loss", "tta"}.isdisjoint(m) for m in metrics
               if m["epoch"] not in evaluated)
    every = quiet_train(
        data=str(tiny_npy), epochs=5, hidden=(4,), batch_size=16, lr=0.5, val=100, seed=2, schedule="constant",
        tta="flip", out=str(tmp_path / "every"))
    # Evaluating less often changes nothing the run trains: the same figures where both evaluated.
    assert every["test_acc"] == summary["test_acc"] and every["train_loss"] == summary["train_loss"]
    best = max((m for m in metrics if "val_acc" in m), key=lambda m: m["val_acc"])["epoch"]
    with np.load(tmp_path / "model.npz", allow_pickle=False) as saved:
        assert int(saved["epoch"]) == best == summary["kept"]["epoch"] == best_epoch(metrics)
    assert best_epoch(metrics[:1]) == 1  # nothing validated yet: the last epoch
    assert best_epoch(metrics[:3]) == 2  # the third epoch was not validated: it cannot be the best


def test_time_to_accuracy_reports_the_first_epoch_past_each_threshold():
    from fastnet.run_folder import time_to_accuracy

    history = [{"epoch": 1, "test_acc": 0.48, "train_seconds": 2.0},
               {"epoch": 2, "test_acc": 0.56, "train_seconds": 4.0},
               {"epoch": 3, "test_acc": 0.55, "train_seconds": 6.0},
               {"epoch": 4, "test_acc": 0.61, "train_seconds": 8.0}]
    assert time_to_accuracy(history, (0.5, 0.55, 0.6, 0.65)) == [
        "time to test accuracy: 50% after 4.0 s (epoch 2), 55% after 4.0 s (epoch 2), 60% after 8.0 s (epoch 4)"]
    assert time_to_accuracy(history[:1], (0.5,)) == []


def test_a_recipe_is_a_starting_point_that_flags_override():
    from fastnet.config import RECIPES, recipe_config

    fast = recipe_config("fast")
    assert fast.recipe == "fast" and all(getattr(fast, k) == v for k, v in RECIPES["fast"].items())
    changed = recipe_config("best", epochs=2, norm=None)  # --norm none turns the recipe's layer norm off
    assert changed.epochs == 2 and changed.norm is None and changed.backend == RECIPES["best"]["backend"]
    assert recipe_config(None, epochs=3) == TrainConfig(epochs=3)
    # Its whitening goes with its components, unless asked for; asked for without them, it is refused.
    assert not recipe_config("best", pca=0).whiten and recipe_config("best", pca=0, whiten=True).whiten
    with pytest.raises(FastnetError, match="unknown recipe 'slow'"):
        recipe_config("slow")


# --- Training on principal components (--pca) --------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("augmentation", [{}, {"flip": True}, {"flip": True, "translate": 1}],
                         ids=["plain", "flip", "pixel-augmentation"])
def test_a_pca_run_trains_on_components_and_saves_a_model_of_raw_images(backend, augmentation, tiny_npy, tmp_path):
    from fastnet import data
    from fastnet.evaluation import evaluate

    for name in ("a", "b"):
        quiet_train(data=str(tiny_npy), backend=backend, pca=6, epochs=2, hidden=(8,), batch_size=32, val=30,
                    out=str(tmp_path / name), **augmentation)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["sizes"] == [6, 8, 3] and config["pca"] == 6
    metrics = read_metrics(tmp_path / "a")
    # Six components of 48 pixels keep the brightness classes apart (chance: 1/3), though shifts that
    # bring in a quarter of padding blur them in 2 epochs.
    assert metrics[-1]["test_acc"] > (0.7 if "translate" in augmentation else 0.9)
    # The fit and projection count as training time.
    assert 0 < config["preprocess_seconds"]
    assert metrics[0]["train_seconds"] == pytest.approx(config["preprocess_seconds"] + metrics[0]["epoch_seconds"])

    saved = checkpoint.load(str(tmp_path / "a" / "model.npz"), backend=backend)
    assert saved.net.sizes == [48, 8, 3] and saved.trained_net.sizes == [6, 8, 3]
    assert saved.projection.shape == (48, 6) and saved.projection.dtype == np.float32
    dataset = data.load_dataset(tiny_npy)
    # fastnet evaluate runs the network on the components, as training did: the very same numbers as
    # the epoch that model.npz keeps, the first with the best validation accuracy.
    evaluated = report.evaluate_saved_model(str(tmp_path / "a"), str(tiny_npy), backend)[2]
    kept = max(metrics, key=lambda epoch: (epoch["val_acc"], -epoch["epoch"]))
    assert (evaluated.accuracy, evaluated.loss) == (kept["test_acc"], kept["test_loss"])
    # The folded network on raw images computes the same, to float32 rounding.
    shift, scale = normalizer(saved.mean, saved.std, dataset.input_size, np.uint8, np.float32)
    folded = evaluate(saved.net, dataset.test_images, dataset.test_labels, shift, scale)
    assert np.mean(folded.predictions == evaluated.predictions) >= 1 - 1 / 90
    assert folded.loss == pytest.approx(evaluated.loss, rel=1e-4)
    other = checkpoint.load(str(tmp_path / "b" / "model.npz"), backend=backend)
    assert np.array_equal(saved.projection, other.projection)
    assert all(np.array_equal(p, q) for p, q in zip(saved.net.params, other.net.params, strict=True))
    if augmentation == {"flip": True}:  # flips by sign, so the components are mirror-symmetric or not
        assert set(data.mirror_signs(saved.projection, dataset.sample_shape)) == {-1.0, 1.0}
    if augmentation:  # and augmenting changed the training
        quiet_train(data=str(tiny_npy), backend=backend, pca=6, epochs=2, hidden=(8,), batch_size=32, val=30,
                    out=str(tmp_path / "plain"))
        assert read_metrics(tmp_path / "plain")[-1]["train_loss"] != metrics[-1]["train_loss"]


def test_no_float64_reaches_a_kernel_in_a_float32_pca_run(tiny_npy, tmp_path):
    from fastnet import backends
    from helpers import Float64Detector

    detector = Float64Detector(backends.get("numba"))
    backends.register("float64-detector", detector)
    try:
        quiet_train(data=str(tiny_npy), backend="float64-detector", pca=5, epochs=1, hidden=(8,), batch_size=32,
                    out=str(tmp_path))
    finally:
        backends._backends.pop("float64-detector")
    assert detector.calls > 50  # the projection, every training step and the evaluation went through it
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as saved:
        assert {saved[name].dtype for name in saved.files if name.startswith(("param_", "optim_", "input_"))
                if saved[name].ndim} == {np.dtype(np.float32)}


def test_the_normalisation_is_fitted_on_the_images_the_validation_split_leaves(tiny_npy, tmp_path):
    """model.npz's mean and std are those of the training images that --val keeps (split as the run's
    generator splits them), not those of every training image."""
    from fastnet import data

    quiet_train(data=str(tiny_npy), epochs=1, hidden=(4,), val=100, seed=5, out=str(tmp_path))
    dataset = data.load_dataset(tiny_npy)
    kept, _, held_out, _ = data.split_validation(dataset.train_images, dataset.train_labels, 100,
                                                 np.random.default_rng(5))
    assert len(kept) == len(dataset.train_images) - 100 and len(held_out) == 100
    with np.load(tmp_path / "model.npz", allow_pickle=False) as saved:
        mean, std = saved["mean"], saved["std"]
    expected_mean, expected_std = data.channel_stats(kept)
    assert np.array_equal(mean, expected_mean) and np.array_equal(std, expected_std)
    everything_mean, everything_std = data.channel_stats(dataset.train_images)
    assert not np.allclose(mean, everything_mean, rtol=1e-4) or not np.allclose(std, everything_std, rtol=1e-4)


# --- The training loop's hooks, for other drivers (sweeps, data-parallel training) ------------------------

def test_after_backward_sees_every_steps_gradients_before_the_update(tiny_npy, tmp_path):
    """Called once per step of the run (not in the warm-up), with the gradients in ws.grads: a hook
    that zeroes them leaves the parameters where the seed put them (no weight decay)."""
    calls = []

    def zero_the_gradients(net, ws, loss, correct):
        calls.append(float(sum(np.abs(g).sum() for g in ws.grads)))
        for g in ws.grads:
            g[...] = 0

    settings = dict(data=str(tiny_npy), epochs=2, hidden=(4,), batch_size=50, weight_decay=0.0)
    train(TrainConfig(**settings, out=str(tmp_path / "frozen")), log=lambda line: None,
          after_backward=zero_the_gradients)
    assert len(calls) == 2 * 6 and all(total > 0 for total in calls)  # 300 images in batches of 50
    from fastnet.model import MLP

    initial = MLP([48, 4, 3], seed=np.random.default_rng(0))  # as the run draws it: seed 0, no --val
    frozen = checkpoint.load(tmp_path / "frozen" / "model.npz")
    for p, q in zip(frozen.net.params, initial.params, strict=True):
        assert np.array_equal(p, q)


def test_after_epoch_may_stop_the_run_and_sees_each_epochs_metrics(tiny_npy, tmp_path):
    seen = []

    def stop_after_two(summary):
        seen.append(summary)
        return summary["epoch"] == 2

    summary = train(TrainConfig(data=str(tiny_npy), epochs=5, hidden=(4,), val=50, out=str(tmp_path)),
                    log=lambda line: None, after_epoch=stop_after_two)
    assert [m["epoch"] for m in seen] == [1, 2] and summary["epoch"] == 2
    assert read_metrics(tmp_path) == seen and "val_acc" in seen[-1]
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as saved:  # resumable where it stopped
        assert json.loads(str(saved["progress"]))["epochs_done"] == 2


# The views of --tta flip+shift by hand: the image and its mirror image, as they are and moved one pixel
# up, down, left and right (rows dy down, columns dx right), in evaluation's order.
FLIP_SHIFT_MOVES = [(flip, dy, dx) for flip in (False, True) for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))]


def views_by_hand(standardised, tta):
    """The views of (N, H, W, C) standardised images that `tta` averages, made with np.pad: zeros (the
    mean pixel) come in from beyond the border."""
    moves = FLIP_SHIFT_MOVES if tta == "flip+shift" else [(False, 0, 0), (True, 0, 0)]
    height, width = standardised.shape[1:3]
    views = []
    for flip, dy, dx in moves:
        image = standardised[:, :, ::-1] if flip else standardised
        padded = np.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)))
        views.append(padded[:, 1 - dy:1 - dy + height, 1 - dx:1 - dx + width])
    return views


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("projected", [False, True], ids=["pixels", "pca"])
@pytest.mark.parametrize("tta", ["flip", "flip+shift"])
def test_averaged_evaluation_scores_the_mean_logits_of_the_views_of_each_image(backend, projected, tta, tiny_npy):
    from fastnet import data
    from fastnet.evaluation import evaluation_inputs
    from fastnet.model import MLP

    dataset = data.load_dataset(tiny_npy)
    rng = np.random.default_rng(5)
    net = MLP([6 if projected else 48, 16, 3], backend=backend, seed=rng)
    shift, scale = normalizer(*data.channel_stats(dataset.train_images), 48, np.uint8, np.float32)
    projection = None
    if projected:
        projection = data.principal_components(dataset.train_images, shift, scale, 6, rng, net.kernels, whiten=True)
    labels = dataset.test_labels
    averaged, plain = (evaluation_inputs(dataset.test_images, dataset.sample_shape, shift, scale, projection,
                                         net.kernels, choice).evaluate(net, labels) for choice in (tta, None))

    # The reference, in float64: the views standardised and made by hand, projected by hand; the
    # network's own forward pass on each, averaged.
    standardised = (dataset.test_images - shift.astype(np.float64).reshape(4, 4, 3)) * scale.reshape(4, 4, 3)

    def inputs(view):
        rows = view.reshape(len(view), -1)
        return rows if projection is None else rows @ projection.astype(np.float64)

    def cross_entropy(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels])

    views = views_by_hand(standardised, tta)
    assert len(views) == (10 if tta == "flip+shift" else 2)
    logits = [net.forward(inputs(view).astype(np.float32)).astype(np.float64) for view in views]
    mean = np.mean(logits, axis=0)
    assert averaged.loss == pytest.approx(cross_entropy(mean), rel=1e-4)
    assert plain.loss == pytest.approx(cross_entropy(logits[0]), rel=1e-4)
    assert plain.loss != pytest.approx(averaged.loss, rel=1e-3)  # the other views do count
    if tta == "flip+shift":  # and the shifted ones too: the mean of the two unshifted ones is another figure
        assert averaged.loss != pytest.approx(cross_entropy((logits[0] + logits[5]) / 2), rel=1e-3)
    top_two = np.sort(mean, axis=1)[:, -2:]
    decided = top_two[:, 1] - top_two[:, 0] > 1e-4  # float32 may break a near tie either way
    assert np.array_equal(averaged.predictions[decided], mean.argmax(axis=1)[decided])
    assert averaged.accuracy == np.mean(averaged.predictions == labels)


def test_a_run_on_data_in_memory_trains_what_a_run_on_files_does_and_writes_nothing(tiny_npy, tmp_path,
                                                                                     monkeypatch):
    settings = dict(epochs=3, hidden=(8,), val=60, batch_size=32)
    on_files = train(TrainConfig(data=str(tiny_npy), out=str(tmp_path / "run"), **settings), log=lambda line: None)
    loaded = data.load_dataset(tiny_npy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lines = []
    run = TrainingRun(TrainConfig(**settings), log=lines.append, dataset=loaded, folder=False)
    in_memory = run.execute()
    assert list(elsewhere.iterdir()) == []  # no runs/ folder, nothing at all
    timing = set(TIMING_METRICS) | {"out", "kept"}
    assert {k: v for k, v in in_memory.items() if k not in timing} == {k: v for k, v in on_files.items()
                                                                       if k not in timing}
    assert in_memory["out"] is None and "writing to" not in lines[0]
    saved = checkpoint.load(str(tmp_path / "run" / "model.npz"))
    for ours, theirs in zip(run.net.params, saved.trained_net.params, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_driver_runs_epochs_in_steps_and_changes_what_they_train_on(tiny_npy):
    """run_epochs(until) and train_on, as the scikit-learn estimator's partial_fit drives them."""
    loaded = data.load_dataset(tiny_npy)
    whole = TrainingRun(TrainConfig(epochs=3, hidden=(8,), batch_size=32), log=lambda line: None, dataset=loaded,
                        folder=False)
    whole.execute()
    stepped = TrainingRun(TrainConfig(epochs=3, hidden=(8,), batch_size=32), log=lambda line: None, dataset=loaded,
                          folder=False)
    assert stepped.prepare()
    for epoch in (1, 2, 3):
        stepped.run_epochs(until=epoch)
        assert stepped.progress.epochs_done == epoch
        stepped.train_on(loaded.train_images, loaded.train_labels)
    assert [m["test_acc"] for m in stepped.progress.history] == [m["test_acc"] for m in whole.progress.history]
    stepped.train_on(loaded.train_images[:100], loaded.train_labels[:100])
    stepped.run_epochs(until=4)
    assert stepped.progress.history[-1]["epoch"] == 4 and stepped.progress.step == whole.progress.step + 4


def test_a_whitened_flip_averaged_run_reports_what_evaluate_and_predict_find(tiny_npy, tmp_path):
    from fastnet import data, predict

    quiet_train(data=str(tiny_npy), pca=6, whiten=True, flip=True, tta="flip", epochs=2, hidden=(8,), batch_size=32,
                out=str(tmp_path))
    metrics = read_metrics(tmp_path)
    assert all(m["tta"] == "flip" for m in metrics)
    saved, dataset, evaluated = report.evaluate_saved_model(str(tmp_path), str(tiny_npy))
    assert (evaluated.accuracy, evaluated.loss) == (metrics[-1]["test_acc"], metrics[-1]["test_loss"])
    plain = report.evaluate_saved_model(str(tmp_path), str(tiny_npy), tta=None)[2]
    assert plain.loss != evaluated.loss
    # Whitened: the projected training images have about unit variance along the strong components.
    components = data.project(dataset.train_images, *normalizer(saved.mean, saved.std, 48, np.uint8, np.float32),
                              saved.projection, saved.net.kernels)
    assert 0.5 < components.var(axis=0)[0] <= 1.0
    # fastnet.load (predict.load) predicts with the run's test-time augmentation, and without it when asked.
    model, unflipped = predict.load(tmp_path), predict.load(tmp_path, tta=None)
    assert model.tta == "flip" and unflipped.tta is None
    both = unflipped.logits(dataset.test_images) + unflipped.logits(dataset.test_images[:, :, ::-1])
    np.testing.assert_allclose(model.logits(dataset.test_images), both / 2, rtol=1e-5, atol=1e-5)
    assert np.array_equal(model.predict(dataset.test_images), evaluated.predictions)
    # The command says which it used, and prints the run's own figure.
    shown, plain_shown = (json.loads(fastnet("evaluate", tmp_path, "--data", tiny_npy, "--json", *tta).stdout)
                          for tta in ((), ("--tta", "none")))
    assert (shown["tta"], shown["accuracy"], plain_shown["tta"]) == ("flip", metrics[-1]["test_acc"], None)
    assert plain_shown["loss"] == pytest.approx(plain.loss, rel=1e-6)


def test_a_flip_and_shift_averaged_run_reports_what_evaluate_predict_and_load_find(tiny_npy, tmp_path):
    """A --pca --translate run (each view projected once) evaluated with --tta flip+shift: every epoch
    line and metrics line says so, and evaluate, predict and fastnet.load find its figures from the
    mean of the 10 views' logits."""
    from PIL import Image

    from fastnet import predict

    lines = []
    train(TrainConfig(data=str(tiny_npy), pca=6, flip=True, translate=1, tta="flip+shift", epochs=2, hidden=(8,),
                      batch_size=32, val=50, out=str(tmp_path)), log=lines.append)
    metrics = read_metrics(tmp_path)
    assert [m["tta"] for m in metrics] == ["flip+shift", "flip+shift"]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert all(" val+flip+shift " in line and " test+flip+shift " in line for line in epoch_lines)

    saved, dataset, evaluated = report.evaluate_saved_model(str(tmp_path), str(tiny_npy))
    kept = metrics[int(saved.arrays["epoch"]) - 1]  # the epoch of the best validation figure
    assert (evaluated.accuracy, evaluated.loss) == (kept["test_acc"], kept["test_loss"])
    assert report.evaluate_saved_model(str(tmp_path), str(tiny_npy), tta="flip")[2].loss != evaluated.loss

    # fastnet.load: the mean of the network's logits on the 10 views, made and projected by hand.
    model = predict.load(tmp_path)
    assert model.tta == "flip+shift" and predict.load(tmp_path, tta="flip").tta == "flip"
    shift, scale = normalizer(saved.mean, saved.std, 48, np.uint8, np.float64)
    standardised = (dataset.test_images - shift.reshape(4, 4, 3)) * scale.reshape(4, 4, 3)
    by_hand = np.mean([saved.trained_net.forward((view.reshape(len(view), -1) @ saved.projection).astype(np.float32))
                       for view in views_by_hand(standardised, "flip+shift")], axis=0)
    np.testing.assert_allclose(model.logits(dataset.test_images), by_hand, rtol=1e-4, atol=1e-4)
    assert np.array_equal(model.predict(dataset.test_images), evaluated.predictions)

    # The commands say which they used, and find the same numbers.
    shown = json.loads(fastnet("evaluate", tmp_path, "--data", tiny_npy, "--json").stdout)
    assert (shown["tta"], shown["accuracy"], shown["loss"]) == ("flip+shift", kept["test_acc"], kept["test_loss"])
    text = fastnet("evaluate", tmp_path, "--data", tiny_npy).stdout.splitlines()[0]
    assert text.endswith(", each averaged over 10 views: it and its mirror image, as they are and shifted a pixel "
                         "up, down, left and right")
    Image.fromarray(dataset.test_images[0]).save(tmp_path / "first.png")
    predicted = json.loads(fastnet("predict", tmp_path, tmp_path / "first.png", "--json", "--top", 3).stdout)
    top = {item["index"]: item["probability"] for item in predicted["predictions"][0]["top"]}
    np.testing.assert_allclose([top[i] for i in range(3)], model.predict_proba(dataset.test_images[:1])[0],
                               rtol=1e-5, atol=1e-6)
    flip_only = json.loads(fastnet("predict", tmp_path, tmp_path / "first.png", "--json", "--top", 3,
                                   "--tta", "flip").stdout)
    assert flip_only["predictions"][0]["top"] != predicted["predictions"][0]["top"]


# --- Weight averaging (--ema) ---------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ema_saves_the_moving_average_of_every_steps_parameters(backend, precision, tiny_npy, tmp_path, monkeypatch):
    """model.npz holds the average computed here, in float64, from the parameters after every step:
    average_0 = the initial parameters, average_t = d_t average_(t-1) + (1 - d_t) param_t with
    d_t = min(0.6, (1 + t) / (10 + t)), which warms up until step 13 and is 0.6 after it. In bf16 it is
    the average of the float32 master weights. checkpoint.npz keeps the raw parameters."""
    from fastnet import precision as precisions

    monkeypatch.setenv(precisions.ANY_CPU, "1")  # bf16 on any CPU: the numbers are tested, not the speed
    seen = []  # the parameters each step starts from: the initial ones, then those after each step

    def record(net, ws, loss, correct):
        seen.append([p.astype(np.float64) for p in net.params])

    quiet = dict(log=lambda line: None, after_backward=record)
    train(TrainConfig(data=str(tiny_npy), backend=backend, precision=precision, epochs=2, hidden=(16,),
                      norm="layernorm", batch_size=32, ema=0.6, out=str(tmp_path)), **quiet)
    final = checkpoint.load(str(tmp_path / "checkpoint.npz")).net.params
    steps = seen[1:] + [[p.astype(np.float64) for p in final]]
    assert len(steps) == 2 * 10  # 300 images in batches of 32
    average = seen[0]
    for t, params in enumerate(steps, start=1):
        decay = min(0.6, (1 + t) / (10 + t))
        average = [decay * a + (1 - decay) * p for a, p in zip(average, params, strict=True)]

    saved = checkpoint.load(str(tmp_path / "model.npz")).net.params
    assert len(saved) == 6  # W1, b1, the layer norm's gain and bias, W2, b2
    for i, (got, want, raw) in enumerate(zip(saved, average, final, strict=True)):
        # Each step rounds the average to float32 once or twice, and later steps shrink earlier errors.
        tol = 4 * len(steps) * np.finfo(np.float32).eps * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"param_{i}")
        assert np.abs(raw - want).max() > 100 * tol, f"param_{i}: the average is not apart from the parameters"


def test_ema_evaluation_reports_what_evaluate_finds_in_model_npz(tiny_npy, tmp_path):
    """Every epoch's test figures are of the average, as model.npz holds it: `fastnet evaluate` finds the
    reported loss and accuracy there, and other figures in the raw parameters of checkpoint.npz, which
    are those of the same run without --ema, bit for bit: the average changes no step."""
    args = ["train", "--data", tiny_npy, "--epochs", 2, "--hidden", 8, "--batch-size", 32]
    plain = fastnet(*args, "--out", tmp_path / "plain")
    result = fastnet(*args, "--ema", 0.9, "--out", tmp_path / "run")
    assert result.returncode == 0 and plain.returncode == 0, result.stderr + plain.stderr
    raw = [checkpoint.load(str(tmp_path / run / "checkpoint.npz")).net.params for run in ("run", "plain")]
    assert all(p.tobytes() == q.tobytes() for p, q in zip(*raw, strict=True))
    last = read_metrics(tmp_path / "run")[-1]
    assert last["ema"] == 0.9
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and f"test(ema) {last['test_loss']:.3f} {last['test_acc']:6.2%}" in lines[-1]
    found = {}
    for name in ("model.npz", "checkpoint.npz"):
        evaluated = fastnet("evaluate", tmp_path / "run" / name, "--data", tiny_npy, "--json")
        assert evaluated.returncode == 0, evaluated.stderr
        found[name] = json.loads(evaluated.stdout)
    assert found["model.npz"]["accuracy"] == last["test_acc"]
    assert found["model.npz"]["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert found["checkpoint.npz"]["loss"] != pytest.approx(last["test_loss"], rel=1e-3)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ema"] == 0.9
