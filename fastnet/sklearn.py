"""fastnet as a scikit-learn estimator: `fastnet.sklearn.MLPClassifier`, for pipelines, grid searches and
any 2-D numeric data (flattened images, tables).

It is not a wrapper of the command: fit builds a train.TrainingRun on the samples it is given (an
in-memory data.Dataset, no run folder) and runs its phases, so the network, the steps, the kernels,
the schedule and the validation split are those of `fastnet train`, drawn from the same seed in the
same order. What differs is what a scikit-learn user expects of an estimator:

- X is standardised per feature (data.feature_stats), not per channel: the columns of a table have
  scales of their own, and a flattened image gives no channels to share statistics over;
- X is float32 whatever it comes as (the network's dtype), and labels are any values: classes_ holds
  them sorted, the network their indices;
- the settings have scikit-learn's names where they mean what scikit-learn's do (hidden_layer_sizes,
  max_iter, batch_size, random_state, early_stopping ...) and fastnet's where they do not (lr,
  schedule, optimizer, weight_decay): docs/scikit-learn.md lists them. Their rules are fastnet's
  (fastnet.settings), checked when fit starts, and a broken one is a ValueError that names the
  estimator's parameter.

Requires scikit-learn: pip install 'fastnet[sklearn]'.
"""

import contextlib
import math
import numbers
import signal
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from fastnet import backends, data, settings
from fastnet.config import TrainConfig
from fastnet.errors import DivergenceError, FastnetError, Interrupted, SettingError
from fastnet.evaluation import EVAL_BATCH
from fastnet.predict import softmax
from fastnet.train import TrainingRun

_DEFAULTS = TrainConfig()  # the estimator's defaults are fastnet train's
# The estimator's names of TrainConfig's fields, where they differ: what an error message calls them.
_NAMES = {"hidden": "hidden_layer_sizes", "epochs": "max_iter", "seed": "random_state"}
# BLAS multiplies a product of fewer rows than this with other kernels (one row: a matrix-vector
# product), whose sums round otherwise; predicting in chunks padded to a multiple of it gives a row
# the same probabilities whichever rows it is predicted with (on the numba backend, whose tiles
# split rows at multiples of it too).
_ROW_MULTIPLE = 4


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """A dense network classifier trained by fastnet, with scikit-learn's estimator API.

    hidden_layer_sizes: the hidden layers' widths (an int for one layer); max_iter: the epochs (fewer
    with early_stopping); batch_size: the minibatch, at most the training samples; optimizer ("sgd",
    "momentum", "nesterov", "adam", "adamw"), lr (the schedule's peak), momentum, weight_decay (L2 on
    the weight matrices, added to the gradient: scikit-learn's alpha over the batch size), schedule
    ("constant", "step", "cosine", "onecycle") and warmup as in fastnet train; activation ("relu",
    "leaky_relu", "gelu", "tanh"), norm (None or "layernorm"), dropout; ema (None, or the decay per step
    of the weight average that becomes the fitted network, as --ema; fastnet.averaging); backend ("numpy", "numba";
    None: $FASTNET_BACKEND or numpy), threads (None: the backend's default, which joblib's workers
    set to their share of the cores), precision ("fp32" or "bf16").

    early_stopping holds out validation_fraction of the samples (fastnet train's --val) and stops when
    the validation accuracy has not improved by tol for more than n_iter_no_change epochs, keeping the
    network of the best epoch. Without it, every epoch of the schedule runs. warm_start makes fit
    continue from the last fit's network and standardisation; partial_fit trains one epoch on the
    samples it is given (classes on the first call). verbose prints fastnet train's lines.

    Fitted: classes_, n_features_in_ (and feature_names_in_), network_ (the fastnet.MLP; with ema, the
    weight average), mean_ and std_ (the standardisation of each feature), n_iter_, loss_, loss_curve_,
    validation_scores_ and best_validation_score_ (with early_stopping, else None), n_threads_.
    """

    def __init__(self, hidden_layer_sizes=_DEFAULTS.hidden, *, max_iter=_DEFAULTS.epochs,
                 batch_size=_DEFAULTS.batch_size, optimizer=_DEFAULTS.optimizer, lr=_DEFAULTS.lr,
                 momentum=_DEFAULTS.momentum, weight_decay=_DEFAULTS.weight_decay, schedule=_DEFAULTS.schedule,
                 warmup=_DEFAULTS.warmup, activation=_DEFAULTS.activation, norm=_DEFAULTS.norm,
                 dropout=_DEFAULTS.dropout, ema=_DEFAULTS.ema, backend=None, threads=None,
                 precision=_DEFAULTS.precision, early_stopping=False, validation_fraction=0.1, n_iter_no_change=10,
                 tol=1e-4, random_state=None, warm_start=False, verbose=False):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup = warmup
        self.activation = activation
        self.norm = norm
        self.dropout = dropout
        self.ema = ema
        self.backend = backend
        self.threads = threads
        self.precision = precision
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    # --- Training -----------------------------------------------------------------------------------

    def fit(self, X, y):
        """Train max_iter epochs (fewer with early_stopping) on X (n_samples, n_features) and labels y;
        from the last fit's network with warm_start. Returns self."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """Train one epoch on X and y, continuing the network so far; `classes`, every label the calls
        will see, is needed on the first call. Returns self."""
        if self.early_stopping:
            raise ValueError("partial_fit trains on the samples of each call and holds none out: set "
                             "early_stopping=False")
        return self._fit(X, y, incremental=True, classes=classes)

    def _fit(self, X, y, incremental, classes=None):
        fitted = hasattr(self, "network_")
        continuing = fitted and (incremental or self.warm_start)
        X, y = validate_data(self, X, y, dtype=np.float32, order="C", reset=not continuing)
        check_classification_targets(y)
        classes = self._classes(y, incremental, continuing, classes)
        codes = np.searchsorted(classes, y).astype(np.int64)
        dataset = data.Dataset(X, codes, None, None, tuple(map(str, classes)),
                               f"the X given to {'partial_fit' if incremental else 'fit'}")
        tracker = _EpochTracker(self)
        with _as_value_errors(self.lr), backends.use_threads(self.backend, self._threads()):
            run = getattr(self, "_run", None) if incremental and continuing else None
            if run is None:
                run = self._start_run(dataset, len(X), tracker, continuing)
            else:
                run.after_epoch = tracker
                run.train_on(X, codes)
            tracker.net = run.model
            threads = backends.parallelism(run.net.backend)["threads"]
            try:
                run.run_epochs(until=run.progress.epochs_done + (1 if incremental else self.max_iter))
            except Interrupted as stop:
                self._keep(run, classes, tracker, continuing, threads)
                if stop.signal_name != "SIGINT":  # what the process was asked to do, now that the step is done
                    signal.raise_signal(getattr(signal, stop.signal_name))
                warnings.warn("Training interrupted by user.", stacklevel=3)
                return self
        self._keep(run, classes, tracker, continuing, threads)
        return self

    def __sklearn_is_fitted__(self):
        return hasattr(self, "network_")

    def _classes(self, y, incremental, continuing, classes):
        """The classes of the model: y's, the first partial_fit's `classes`, or the fitted ones; a
        ValueError when y holds a label outside them or the model would have a single class."""
        if continuing:
            if classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
                raise ValueError(f"classes={classes!r} is not the same as on the first call to partial_fit: "
                                 f"{self.classes_!r}")
            classes = self.classes_
            if self.warm_start and not incremental and not np.array_equal(unique_labels(y), classes):
                raise ValueError(f"warm_start continues a model of the classes {classes!r}, and y has "
                                 f"{unique_labels(y)!r}: pass samples of the same classes, or set warm_start=False")
        elif incremental:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit: every label the calls "
                                 "will see, e.g. np.unique(y_all)")
            classes = unique_labels(classes)
        else:
            classes = unique_labels(y)
        unknown = np.setdiff1d(unique_labels(y), classes)
        if len(unknown):
            raise ValueError(f"y has labels that are not among the classes {classes!r}: {unknown!r}")
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes to tell apart, and y has only one "
                             f"class: {classes[0]!r}")
        return classes

    def _threads(self):
        if self.threads is not None:
            settings.positive_integer("threads", self.threads, 2)
        return self.threads

    def _start_run(self, dataset, samples, tracker, continuing):
        """A TrainingRun of the estimator's settings on `dataset`, prepared; a continuing one starts
        from the fitted network and standardisation."""
        val = 0
        if self.early_stopping:
            fraction = settings.fraction("validation_fraction", self.validation_fraction, 0.1)
            val = math.ceil(fraction * samples)
            most = data.most_held_out(dataset.train_labels)
            if val < 2 or val > most:
                raise ValueError(f"validation_fraction={fraction:g} of {samples} samples holds out {val}: the "
                                 f"validation split needs 2 or more, and the training split one sample of each of "
                                 f"the {samples - most} classes; change validation_fraction, or pass more samples")
            settings.positive_integer("n_iter_no_change", self.n_iter_no_change, 10)
            settings.not_negative("tol", self.tol, "pass 0 to count any improvement")
        hidden = self.hidden_layer_sizes
        hidden = (hidden,) if isinstance(hidden, numbers.Integral) else hidden
        batch = self.batch_size
        if isinstance(batch, numbers.Integral) and not isinstance(batch, bool):
            batch = min(batch, samples - val)  # scikit-learn's convention: clipped to the samples
        random_state = check_random_state(self.random_state)  # a ValueError for what is none of its kinds
        seed = (self.random_state if isinstance(self.random_state, numbers.Integral)
                else int(random_state.randint(np.iinfo(np.int32).max)))
        config = TrainConfig(backend=self.backend, hidden=hidden, epochs=self.max_iter, batch_size=batch,
                             optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, schedule=self.schedule, warmup=self.warmup, seed=seed,
                             val=val, activation=self.activation, norm=self.norm, dropout=self.dropout,
                             ema=self.ema, precision=self.precision)
        statistics = (lambda images: (self.mean_, self.std_)) if continuing else data.feature_stats
        run = TrainingRun(config, log=print if self.verbose else (lambda line: None), after_epoch=tracker,
                          dataset=dataset, statistics=statistics, folder=False)
        run.prepare()
        if continuing:
            before = self.network_
            if [p.shape for p in before.params] != [p.shape for p in run.net.params]:
                raise ValueError(f"warm_start continues the fitted {'-'.join(map(str, before.sizes))} network, and "
                                 f"the settings now make a {'-'.join(map(str, run.net.sizes))} one: set "
                                 f"warm_start=False to start anew")
            run.net.load_params(before.params)
            if run.average is not None:
                run.average.restart()
        return run

    def _keep(self, run, classes, tracker, continuing, threads):
        """The fitted attributes, from the run as it stands: set only once a fit has trained, so that a
        fit that fails leaves the estimator as it was (but for what validate_data sets)."""
        tracker.restore_best(run.model)
        if not continuing:
            self.loss_curve_, self.validation_scores_ = [], None
        self.loss_curve_ = self.loss_curve_ + tracker.losses
        if tracker.scores:
            self.validation_scores_ = (self.validation_scores_ or []) + tracker.scores
        self.n_threads_ = threads
        self._run = run
        self.network_ = run.model
        self._shift, self._scale = run.shift, run.scale
        self.mean_, self.std_ = run.mean, run.std
        self.classes_ = classes
        self.n_iter_ = len(tracker.losses)
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else None
        self.best_validation_score_ = tracker.best if tracker.scores else None

    # --- Predicting ---------------------------------------------------------------------------------

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), float32, in the order of classes_."""
        return softmax(self._logits(X))

    def predict_log_proba(self, X):
        """The logarithm of predict_proba."""
        return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most likely class of each sample, one of classes_."""
        logits = self._logits(X)  # first: it tells an unfitted estimator so
        return self.classes_[logits.argmax(axis=1)]

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, order="C", reset=False)
        net = self.network_
        logits = np.empty((len(X), net.sizes[-1]), np.float32)
        with backends.use_threads(net.backend, self._threads()):
            for start in range(0, len(X), EVAL_BATCH):
                rows = X[start:start + EVAL_BATCH]
                ws = net.workspace(-len(rows) // _ROW_MULTIPLE * -_ROW_MULTIPLE, "fp32")
                ws.inputs[len(rows):] = 0.0
                net.kernels.gather_normalize(rows, np.arange(len(rows)), self._shift, self._scale,
                                             ws.inputs[:len(rows)])
                logits[start:start + len(rows)] = net.run_forward(ws)[:len(rows)]
        return logits

    def to_onnx(self):
        """The fitted model as an ONNX model (onnx.ModelProto, checked; pip install 'fastnet[onnx]'):
        float rows "features" (N, n_features_in_) in, "probabilities" (N, n_classes) and "top_class"
        (N,), an index into classes_, out; the standardisation fitted on X is in the graph, and
        classes_ in its metadata. Save it with onnx.save."""
        check_is_fitted(self)
        from fastnet import onnx_export
        return onnx_export.graph_for(self.network_, onnx_export.Preprocessing(self._shift, self._scale),
                                     input="float", top_class=True, class_names=[str(c) for c in self.classes_],
                                     name="fastnet.sklearn.MLPClassifier")

    def __getstate__(self):
        # The run holds the training samples and the kernels: a pickle keeps the model alone, and
        # partial_fit or a warm start after unpickling starts a run from it.
        state = self.__dict__.copy()
        state.pop("_run", None)
        return state


class _EpochTracker:
    """The run's after_epoch hook: the loss curve, and with early stopping the validation scores, the
    parameters of the best epoch, and when to stop (scikit-learn's rule: after more than
    n_iter_no_change epochs that did not beat the best by tol)."""

    def __init__(self, estimator):
        self.estimator = estimator
        self.net = None  # the run's, once it is built
        self.losses, self.scores = [], []
        self.best, self.best_params, self.stale = -np.inf, None, 0

    def __call__(self, summary):
        estimator = self.estimator
        self.losses.append(summary["train_loss"])
        if not estimator.early_stopping:
            return False
        score = summary["val_acc"]
        self.scores.append(score)
        self.stale = self.stale + 1 if score < self.best + estimator.tol else 0
        if score > self.best:
            self.best, self.best_params = score, [p.copy() for p in self.net.params]
        return self.stale > estimator.n_iter_no_change

    def restore_best(self, net):
        if self.best_params is not None:
            net.load_params(self.best_params)


@contextlib.contextmanager
def _as_value_errors(lr):
    """fastnet's errors as scikit-learn's estimators raise them: a ValueError, a setting named as the
    estimator names it."""
    try:
        yield
    except SettingError as error:
        raise SettingError(_NAMES.get(error.setting, error.setting), error.message) from None
    except DivergenceError as error:
        raise ValueError(f"training diverged (a loss or parameter is NaN or infinite): lower lr, e.g. "
                         f"lr={lr / 10:g}") from error
    except FastnetError as error:
        if isinstance(error, ValueError):
            raise
        raise ValueError(str(error)) from error
