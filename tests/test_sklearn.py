"""fastnet.sklearn.MLPClassifier: scikit-learn's own estimator checks, and what the estimator promises
beyond them: it trains through fastnet's TrainingRun (the same numbers), standardises per feature,
continues with partial_fit and warm_start, keeps the best epoch with early_stopping, runs in
pipelines and parallel grid searches, pickles, and refuses bad input as scikit-learn's estimators do."""

import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

try:
    import sklearn  # noqa: F401
except ImportError:  # a developer's machine may lack the extra; CI installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("scikit-learn is not installed: pip install -e '.[sklearn]'", allow_module_level=True)

from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from fastnet import data
from fastnet.config import TrainConfig
from fastnet.sklearn import MLPClassifier
from fastnet.train import TrainingRun
from helpers import unavailable

# Small and quick: scikit-learn's checks fit on at most a few hundred samples of a few features.
QUICK = dict(hidden_layer_sizes=(16,), max_iter=20, batch_size=16)


@parametrize_with_checks([MLPClassifier(**QUICK), MLPClassifier(**QUICK, backend="numba")])
def test_scikit_learn_estimator_checks(estimator, check, monkeypatch):
    # check_array_api_input runs only where SciPy's array API switch is set; with NumPy inputs, as the
    # check gives them, SciPy's mode changes nothing the estimator calls.
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


def blobs(samples=240, features=6, classes=3, seed=0, spread=2.0):
    X, y = make_blobs(samples, n_features=features, centers=classes, cluster_std=spread, random_state=seed)
    return X.astype(np.float32), y


def test_fit_is_a_training_run_of_its_settings():
    """The estimator's network is, bit for bit, what a TrainingRun of the same settings trains on the
    same samples: one training path, fastnet train's."""
    X, y = blobs()
    labels = np.array(["ant", "bee", "cat"])[y]
    clf = MLPClassifier((8, 8), max_iter=4, batch_size=16, optimizer="adam", lr=0.02, dropout=0.1,
                        random_state=5).fit(X, labels)
    run = TrainingRun(TrainConfig(hidden=(8, 8), epochs=4, batch_size=16, optimizer="adam", lr=0.02, dropout=0.1,
                                  seed=5), log=lambda line: None,
                      dataset=data.Dataset(X, y.astype(np.int64), None, None, ("ant", "bee", "cat"), "test"),
                      statistics=data.feature_stats, folder=False)
    summary = run.execute()
    assert summary["out"] is None and "test_acc" not in summary
    for ours, theirs in zip(clf.network_.params, run.net.params, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert clf.loss_curve_ == [m["train_loss"] for m in run.progress.history]
    assert clf.n_iter_ == 4 and clf.loss_ == clf.loss_curve_[-1]
    assert list(clf.classes_) == ["ant", "bee", "cat"]
    assert set(clf.predict(X)) <= {"ant", "bee", "cat"} and clf.score(X, labels) > 0.9


def test_ema_fits_the_weight_average_of_the_run_fit_makes():
    """With ema, network_ is the TrainingRun's weight average, bit for bit, and not its raw network; with
    early_stopping the best epoch is chosen, and kept, by the average's validation accuracy."""
    X, y = blobs()
    clf = MLPClassifier((8,), max_iter=3, batch_size=16, ema=0.9, random_state=5).fit(X, y)
    run = TrainingRun(TrainConfig(hidden=(8,), epochs=3, batch_size=16, ema=0.9, seed=5), log=lambda line: None,
                      dataset=data.Dataset(X, y.astype(np.int64), None, None, ("0", "1", "2"), "test"),
                      statistics=data.feature_stats, folder=False)
    run.execute()
    for ours, average, raw in zip(clf.network_.params, run.model.params, run.net.params, strict=True):
        np.testing.assert_array_equal(ours, average)
        assert not np.array_equal(ours, raw)
    stopped = MLPClassifier((8,), max_iter=3, batch_size=16, ema=0.9, random_state=5, early_stopping=True).fit(X, y)
    assert stopped.score(stopped._run.val_images, stopped._run.val_labels) == stopped.best_validation_score_


def test_each_feature_is_standardised_by_its_own_mean_and_std():
    rng = np.random.default_rng(0)
    informative = rng.integers(0, 2, 400)
    X = np.column_stack([
        rng.normal(5e4, 1e3, 400),                          # large, uninformative
        informative * 2e-4 + rng.normal(0, 5e-5, 400),      # tiny, and all there is to learn
        np.full(400, 7.0),                                  # constant
    ])
    clf = MLPClassifier((16,), max_iter=10, batch_size=32, random_state=0).fit(X, informative)
    np.testing.assert_allclose(clf.mean_[:2], X[:, :2].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(clf.std_[:2], X[:, :2].std(axis=0), rtol=1e-4)
    assert clf.mean_[2] == 7.0 and clf.std_[2] == 1.0  # centred, not blown up
    assert clf.score(X, informative) > 0.95
    standardised = ((X.astype(np.float32) - clf.mean_) / clf.std_).astype(np.float32)
    np.testing.assert_allclose(clf.predict_proba(X), softmax(clf.network_.forward(standardised)), rtol=1e-4,
                               atol=1e-6)


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_partial_fit_is_one_epoch_of_the_run_fit_would_make():
    X, y = blobs()
    fitted = MLPClassifier((16,), max_iter=3, batch_size=32, random_state=1).fit(X, y)
    stepped = MLPClassifier((16,), max_iter=3, batch_size=32, random_state=1)
    for _ in range(3):
        stepped.partial_fit(X, y, classes=[0, 1, 2])
    for ours, theirs in zip(stepped.network_.params, fitted.network_.params, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert stepped.n_iter_ == 1 and len(stepped.loss_curve_) == 3 and stepped.loss_curve_ == fitted.loss_curve_


def test_partial_fit_takes_other_samples_each_call_and_checks_the_classes():
    X, y = blobs(300)
    clf = MLPClassifier((16,), max_iter=5, batch_size=32, schedule="constant", random_state=0)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        clf.partial_fit(X, y)
    for part in range(3):
        rows = slice(part * 100, (part + 1) * 100)
        clf.partial_fit(X[rows], y[rows], classes=np.array([0, 1, 2, 3]))  # a class no chunk has
    assert list(clf.classes_) == [0, 1, 2, 3] and clf.predict_proba(X).shape == (300, 4)
    assert clf.score(X, y) > 0.9
    with pytest.raises(ValueError, match="not among the classes"):
        clf.partial_fit(X[:10], np.full(10, 7))
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(X[:10, :-1], y[:10])
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


def test_warm_start_continues_the_network_and_its_standardisation():
    X, y = blobs(seed=2)
    clf = MLPClassifier((16,), max_iter=2, batch_size=32, lr=0.02, random_state=0, warm_start=True).fit(X, y)
    first_loss, mean = clf.loss_curve_[0], clf.mean_.copy()
    clf.fit(X * 3 + 1, y)  # another scale: the first fit's standardisation stays
    np.testing.assert_array_equal(clf.mean_, mean)
    assert len(clf.loss_curve_) == 4 and clf.n_iter_ == 2
    cold = MLPClassifier((16,), max_iter=2, batch_size=32, lr=0.02, random_state=0).fit(X * 3 + 1, y)
    assert clf.loss_curve_[2] < first_loss and clf.loss_curve_[2] != cold.loss_curve_[0]
    with pytest.raises(ValueError, match="warm_start"):
        clf.set_params(hidden_layer_sizes=(8,)).fit(X, y)


def test_early_stopping_keeps_the_best_epoch_and_stops():
    X, y = blobs(400, seed=3, spread=6.0)  # overlapping classes: the validation accuracy wanders
    clf = MLPClassifier((64,), max_iter=60, batch_size=16, lr=0.2, schedule="constant", early_stopping=True,
                        validation_fraction=0.25, n_iter_no_change=4, random_state=0).fit(X, y)
    scores = clf.validation_scores_
    assert clf.n_iter_ == len(scores) < 60
    assert clf.best_validation_score_ == max(scores) != scores[-1]
    run = clf._run
    assert len(run.val_images) == 100 and len(run.train_images) == 300
    assert clf.score(run.val_images, run.val_labels) == clf.best_validation_score_
    plain = MLPClassifier((16,), max_iter=2).fit(X, y)
    assert plain.validation_scores_ is None and plain.best_validation_score_ is None


def test_verbose_prints_fastnet_trains_lines(capsys):
    X, y = blobs()
    MLPClassifier((16,), max_iter=2, batch_size=32, verbose=True).fit(X, y)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastnet: 6-16-3 MLP") and "writing to" not in lines[0]
    assert lines[1].startswith("epoch 1/2  train ") and lines[2].startswith("epoch 2/2  train ")
    MLPClassifier((16,), max_iter=2, batch_size=32).fit(X, y)
    assert capsys.readouterr().out == ""


def test_a_pickled_estimator_predicts_the_same_and_trains_on():
    X, y = blobs()
    clf = MLPClassifier((16,), max_iter=3, batch_size=32, random_state=0, backend="numba").fit(X, y)
    copy = pickle.loads(pickle.dumps(clf))
    assert not hasattr(copy, "_run")  # the training samples do not travel with the model
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.network_.backend == "numba"
    copy.partial_fit(X, y)
    assert len(copy.loss_curve_) == 4 and copy.score(X, y) > 0.9


@pytest.mark.parametrize("settings", [dict(activation="relu"), dict(activation="gelu", norm="layernorm"),
                                      dict(activation="tanh", backend="numba")], ids=["relu", "gelu-layernorm", "tanh"])
def test_to_onnx_gives_the_estimators_probabilities_in_onnx_runtime(settings):
    import onnxruntime

    X, y = blobs()
    labels = np.array(["cat", "dog", "eel"])[y]
    clf = MLPClassifier((16, 8), max_iter=3, batch_size=32, random_state=0, **settings).fit(X, labels)
    model = clf.to_onnx()
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    X32 = X.astype(np.float32)
    probabilities, top = session.run(["probabilities", "top_class"], {"features": X32})
    np.testing.assert_allclose(probabilities, clf.predict_proba(X32), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(clf.classes_[top], clf.predict(X32))
    assert {p.key: p.value for p in model.metadata_props}["class_names"] == '["cat", "dog", "eel"]'


def interrupt_at_epoch(monkeypatch, epoch, signum):
    """The signal, raised in this process as the run reports `epoch` (as Ctrl-C would arrive then)."""
    from fastnet import sklearn as estimator_module

    report = estimator_module._EpochTracker.__call__

    def and_then_the_signal(tracker, summary):
        if summary["epoch"] == epoch:
            signal.raise_signal(signum)
        return report(tracker, summary)

    monkeypatch.setattr(estimator_module._EpochTracker, "__call__", and_then_the_signal)


def test_ctrl_c_stops_after_the_step_with_a_warning_and_a_usable_model(monkeypatch):
    X, y = blobs()
    interrupt_at_epoch(monkeypatch, 2, signal.SIGINT)
    clf = MLPClassifier((16,), max_iter=50, batch_size=16, random_state=0)
    # Python's Ctrl-C handling, as in a terminal, even where the suite was started ignoring SIGINT (a
    # background job), which the run would leave ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.warns(UserWarning, match="Training interrupted by user"):
            clf.fit(X, y)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert clf.n_iter_ == 2 and clf._run.progress.step == 2 * 15 + 1  # one step of epoch 3, then it stopped
    assert clf.score(X, y) > 0.9


def test_sigterm_is_passed_on_once_the_step_is_done(tmp_path):
    """The run holds SIGTERM until its step is done; the estimator then hands it to the process's own
    handling (here the default: the process ends by it), never swallows it."""
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent("""
        import signal, sys
        import numpy as np
        from fastnet import sklearn as module
        report = module._EpochTracker.__call__
        def and_then_sigterm(tracker, summary):
            if summary["epoch"] == 2:
                signal.raise_signal(signal.SIGTERM)
            return report(tracker, summary)
        module._EpochTracker.__call__ = and_then_sigterm
        signal.signal(signal.SIGTERM, lambda signum, frame: (print("steps", clf._run.progress.step), sys.exit(7)))
        clf = module.MLPClassifier((8,), max_iter=50, batch_size=16, random_state=0)
        clf.fit(np.random.default_rng(0).standard_normal((64, 5)), np.arange(64) % 2)
        print("fit returned")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr
    assert done.stdout.split() == ["steps", str(2 * 4 + 1)]  # the handler ran after one step of epoch 3


def test_bad_input_raises_what_scikit_learn_raises():
    X, y = blobs(60)
    clf = MLPClassifier(**QUICK)
    with pytest.raises(NotFittedError):
        clf.predict(X)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(bad, y)
    with pytest.raises(ValueError, match="dim 3"):
        clf.fit(X.reshape(60, 2, 3), y)
    with pytest.raises(ValueError, match="class"):
        clf.fit(X, np.zeros(60))
    with pytest.raises(ValueError, match="Unknown label type"):
        clf.fit(X, np.linspace(0, 1, 60))
    clf.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        clf.predict(X[:, :4])


@pytest.mark.parametrize("setting, value, named", [
    ("max_iter", 0, "max_iter must be a positive integer"),
    ("hidden_layer_sizes", (16, 0), "hidden_layer_sizes must be"),
    ("lr", -1.0, "lr must be a positive number"),
    ("optimizer", "lbfgs", "unknown optimizer 'lbfgs'"),
    ("backend", "gpu", "unknown backend 'gpu'"),
    ("threads", 0, "threads must be a positive integer"),
    ("ema", 1.0, "ema is a decay per step, in \\(0, 1\\), got 1.0"),
    ("validation_fraction", 0.01, "validation_fraction=0.01 of 60 samples holds out 1"),
    ("validation_fraction", 0.97, "holds out 59: .* one sample of each of the 3 classes"),
])
def test_a_bad_setting_is_a_value_error_that_names_the_parameter(setting, value, named):
    X, y = blobs(60)
    clf = MLPClassifier(**QUICK, early_stopping=True).set_params(**{setting: value})
    with pytest.raises(ValueError, match=named):
        clf.fit(X, y)
    with pytest.raises(NotFittedError):  # a fit that failed left nothing fitted behind
        clf.predict(X)


def test_in_a_pipeline_and_a_parallel_grid_search():
    X, y = blobs(200)
    pipeline = make_pipeline(FunctionTransformer(np.abs), MLPClassifier(**QUICK, random_state=0))
    search = GridSearchCV(pipeline, {"mlpclassifier__lr": [1e-5, 0.05]}, cv=2, n_jobs=2).fit(X, y)
    assert search.best_params_ == {"mlpclassifier__lr": 0.05}
    assert search.best_estimator_.score(X, y) > 0.9


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_parallel_jobs_share_the_cores_out(backend):
    """joblib gives each worker its share of the cores (NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS ...),
    and threads=None trains on it: jobs x threads never exceeds the cores."""
    X, y = blobs(100)
    results = cross_validate(MLPClassifier(**QUICK, backend=backend), X, y, cv=2, n_jobs=2, return_estimator=True)
    cores = os.cpu_count()
    for estimator in results["estimator"]:
        assert 1 <= estimator.n_threads_ <= max(1, cores // 2)


def test_a_data_frame_gives_feature_names():
    try:
        import pandas as pd
    except ImportError:
        unavailable("pandas is not installed: pip install -e '.[dev]'")
    X, y = blobs(60, features=3)
    frame = pd.DataFrame(X, columns=["height", "weight", "age"])
    clf = MLPClassifier(**QUICK).fit(frame, y)
    assert list(clf.feature_names_in_) == ["height", "weight", "age"] and clf.n_features_in_ == 3
    with pytest.warns(UserWarning, match="does not have valid feature names"):  # scikit-learn's warning
        np.testing.assert_array_equal(clf.predict(frame), clf.predict(X))


def test_predictions_do_not_depend_on_the_rows_beside_them():
    """Single rows and odd-sized chunks are padded to the row multiple BLAS computes alike."""
    X, y = blobs(45, features=37)
    clf = MLPClassifier((32,), max_iter=3, batch_size=16, backend="numba", random_state=0).fit(X, y)
    whole = clf.predict_proba(X)
    for size in (1, 3, 5, 7):
        parts = np.concatenate([clf.predict_proba(X[i:i + size]) for i in range(0, 45, size)])
        np.testing.assert_array_equal(parts, whole)
    assert math.isclose(float(whole.sum(axis=1).mean()), 1.0, rel_tol=1e-6)
