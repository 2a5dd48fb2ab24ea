"""Training and evaluation: the epoch loop, its metrics, and what a run writes to disk.

A run draws every random number from one np.random.Generator seeded by `config.seed`: first the
validation split (when asked for), then the initial weights, then the images the --pca components
are fitted to, then one permutation per epoch, and within it each step's augmentations and one
dropout key per hidden layer (the kernels' draw_uniform turns a key into the layer's numbers).

A run's folder holds config.json, metrics.jsonl (one JSON object per epoch), model.npz (the model
after the last finished epoch) and checkpoint.npz (everything needed to resume: written after every
epoch, every --checkpoint-every steps, and when SIGINT or SIGTERM stops the run). Every file is
written to a temporary name and renamed, so a crash never leaves a half-written one.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import zlib
from datetime import datetime

import numpy as np
from threadpoolctl import threadpool_info
from tqdm import tqdm

from fastnet import backends, checkpoint, data, precision, settings
from fastnet.data import downloading
from fastnet.errors import CheckpointError, DivergenceError, FastnetError, Interrupted, SettingError
from fastnet.model import MLP
from fastnet.model import check_settings as check_model_settings
from fastnet.optim import Optimizer, Schedule, check_optimizer, check_schedule

EVAL_BATCH = 1000
TTA = settings.TEST_TIME_AUGMENTATIONS  # --tta: None, or "flip" (fastnet.settings)


def saved_tta(config, tta="run"):
    """The test-time augmentation to evaluate a saved run with: `tta`, or for "run" the run's own."""
    return config.get("tta") if tta == "run" else tta
# The metrics that measure time: they differ between runs that are otherwise bit-identical.
TIMING_METRICS = ("epoch_seconds", "samples_per_second", "train_seconds")
CHECKPOINT = "checkpoint.npz"  # the latest state, to resume from
MODEL = checkpoint.MODEL  # the model after the last finished epoch (with --val: the best), to evaluate and predict with


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. The defaults are the recipe `fastnet train` uses."""

    data: str | None = None
    backend: str | None = None
    hidden: tuple = (512, 512)
    epochs: int = 18
    batch_size: int = 128
    optimizer: str = "nesterov"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-3
    schedule: str = "onecycle"
    warmup: float | None = None
    seed: int = 0
    val: int = 0
    test_fraction: float = 0.0       # of an image tree without test/: the share of each class held out to test on
    image_size: tuple | None = None  # (height, width) every image of an image tree is resized to; None: one size
    out: str | None = None
    dtype: str = "float32"
    precision: str = "fp32"          # "bf16": mixed precision, bfloat16 GEMM operands (fastnet.model)
    activation: str = "relu"
    norm: str | None = None          # "layernorm": on every hidden layer, before the activation
    dropout: float = 0.0             # after every hidden activation
    label_smoothing: float = 0.0
    flip: bool = False               # augmentation: random horizontal flips,
    translate: int = 0               # random shifts of up to this many pixels (zero padding),
    cutout: int = 0                  # and a blanked square of this side
    clip: float | None = None        # gradient clipping by global norm
    pca: int = 0                     # train on this many principal components of the images; 0: pixels
    whiten: bool = False             # with pca: scale each component to unit variance
    tta: str | None = None           # "flip": evaluate on the mean logits of each image and its mirror image
    recipe: str | None = None        # the named recipe these settings started from, if any
    checkpoint_every: int | None = None  # steps; a checkpoint is also written after every epoch

    def check(self):
        """Apply the rule of every setting (fastnet.settings) before anything is read: SettingError
        for the first that no run can use. Returns what config.json records of the precision."""
        defaults = TrainConfig()
        settings.positive_integer("epochs", self.epochs, defaults.epochs)
        settings.positive_integer("batch_size", self.batch_size, defaults.batch_size)
        settings.widths("hidden", self.hidden, ",".join(map(str, defaults.hidden)))
        check_optimizer(self.optimizer, self.momentum, self.weight_decay)
        check_schedule(self.schedule, self.lr, self.warmup)
        if self.checkpoint_every is not None:
            settings.positive_integer("checkpoint_every", self.checkpoint_every, 1000)
        settings.not_negative("val", self.val, "pass 0 for no validation split")
        settings.test_fraction("test_fraction", self.test_fraction)
        settings.image_size("image_size", self.image_size)
        check_model_settings(self.dtype, self.activation, self.dropout, self.norm, self.precision)
        settings.fraction("label_smoothing", self.label_smoothing, 0.1)
        settings.pixels("translate", self.translate)
        settings.pixels("cutout", self.cutout)
        if self.clip is not None:
            settings.positive_number("clip", self.clip, 5, what="gradient norm")
        settings.components("pca", self.pca)
        settings.whitening("whiten", self.whiten, self.pca)
        settings.test_time_augmentation("tta", self.tta)
        backends.get(self.backend)
        return precision.check(self.precision, self.backend)


# Named starting points for `fastnet train --recipe NAME`; flags given with it override its settings.
# docs/recipes.md says how they were found.
RECIPES = {
    "fast": dict(backend="numba", pca=256, whiten=True, epochs=30, lr=0.05, flip=True, tta="flip"),
    "best": dict(backend="numba", pca=512, whiten=True, hidden=(2048, 2048), activation="gelu", norm="layernorm",
                 epochs=40, lr=0.03, weight_decay=5e-4, flip=True, translate=2, dropout=0.1, label_smoothing=0.1,
                 tta="flip"),
}


def recipe_config(recipe=None, **settings):
    """The TrainConfig of `recipe` (None: the plain defaults) with `settings` on top. A recipe's
    whitening goes with its components: `pca=0` turns it off too, unless `whiten` is given as well."""
    if recipe is not None and recipe not in RECIPES:
        raise FastnetError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    chosen = RECIPES.get(recipe, {}) | settings
    if not chosen.get("pca") and "whiten" not in settings:
        chosen.pop("whiten", None)
    return TrainConfig(**chosen, recipe=recipe)


@dataclasses.dataclass
class Evaluation:
    loss: float
    accuracy: float
    predictions: np.ndarray

    def confusion(self, labels, num_classes):
        """counts[true, predicted]."""
        pairs = labels * num_classes + self.predictions
        return np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def normalizer(mean, std, input_size, images_dtype, dtype):
    """Per-feature (shift, scale) so that (pixel - shift) * scale standardises each channel.

    The channel statistics are of images in [0, 1]; uint8 pixels are divided by 255 on the way,
    folded into shift and scale so the kernel does one subtract and one multiply. Features of
    channel-last images cycle through the channels, which np.tile reproduces.
    """
    unit = 255.0 if images_dtype == np.uint8 else 1.0
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    shift = np.tile(mean * unit, input_size // len(mean)).astype(dtype)
    scale = np.tile(1.0 / (std * unit), input_size // len(std)).astype(dtype)
    return shift, scale


def evaluate(net, images, labels, shift, scale, mirrored=None):
    """Mean loss, accuracy and predicted labels of `net` on uint8 or float images. With `mirrored`, the
    same images flipped (data.mirror_images), on the mean of the logits of each image and its mirror
    image (--tta flip)."""
    images = images.reshape(len(images), -1)
    k = net.kernels
    total_loss, predictions = 0.0, np.empty(len(images), np.int64)
    for start in range(0, len(images), EVAL_BATCH):
        stop = min(start + EVAL_BATCH, len(images))
        ws = net.workspace(stop - start, "fp32")  # the master weights: the numbers model.npz gives
        k.gather_normalize(images, np.arange(start, stop), shift, scale, ws.inputs)
        ws.labels[...] = labels[start:stop]
        logits = net.run_forward(ws)
        if mirrored is not None:
            logits = logits.copy()
            k.gather_normalize(mirrored, np.arange(start, stop), shift, scale, ws.inputs)
            logits += net.run_forward(ws)
            logits *= 0.5
        total_loss += k.softmax_cross_entropy(logits, ws.labels, ws.deltas[-1]) * (stop - start)
        predictions[start:stop] = logits.argmax(axis=1)
    accuracy = float(np.mean(predictions == labels)) if len(labels) else float("nan")
    return Evaluation(total_loss / max(len(images), 1), accuracy, predictions)


@dataclasses.dataclass
class EvaluationInputs:
    """What evaluate() reads of one set of images, prepared once: the network's inputs (the images,
    or for a --pca run their components) with the shift and scale that standardise them, and for
    --tta flip the same of the mirror images."""

    images: np.ndarray
    shift: np.ndarray
    scale: np.ndarray
    mirrored: np.ndarray | None = None

    def evaluate(self, net, labels):
        return evaluate(net, self.images, labels, self.shift, self.scale, self.mirrored)

    def rows(self, start, stop):
        mirrored = None if self.mirrored is None else self.mirrored[start:stop]
        return EvaluationInputs(self.images[start:stop], self.shift, self.scale, mirrored)


def evaluation_inputs(images, sample_shape, shift, scale, projection=None, kernels=None, tta=None):
    """The EvaluationInputs of `images` for a network on pixels standardised by (shift, scale), or with
    `projection` for one on their components (evaluate the network as it was trained, not the one
    that folds the projection in: a --pca run evaluates its components once, so each epoch's test
    costs the network alone). `fastnet evaluate` prepares them the same way, so it finds the very
    numbers that training reported."""
    flat = images.reshape(len(images), -1)
    if tta == "flip" and len(sample_shape) not in (2, 3):
        raise FastnetError(f"--tta flip mirrors images, but these samples have shape {tuple(sample_shape)}: "
                           f"pass --tta none")
    mirrored = data.mirror_images(flat, sample_shape) if tta == "flip" else None
    if projection is None:
        return EvaluationInputs(flat, shift, scale, mirrored)
    count = projection.shape[1]
    components = [None if x is None else data.project(x, shift, scale, projection, kernels) for x in (flat, mirrored)]
    return EvaluationInputs(components[0], np.zeros(count, projection.dtype), np.ones(count, projection.dtype),
                            components[1])


@dataclasses.dataclass
class StepOptions:
    """What a training step does besides gather, forward, backward and update."""

    rng: np.random.Generator | None = None  # draws dropout masks and augmentations; None: neither
    # data.Augmentation, or for --pca runs data.ComponentFlip or data.ProjectedAugmentation: anything
    # with Augmentation's apply()
    augmentation: data.Augmentation | None = None
    label_smoothing: float = 0.0
    clip: float | None = None  # the largest global gradient norm; larger gradients are scaled down
    # called as after_backward(net, ws, loss, correct) between backward and clipping; may return the
    # step's (loss, correct) instead (a data-parallel driver returns the global batch's)
    after_backward: object = None
    # called as layer_done(net, ws, layer) by the backward pass as soon as a layer's gradients are
    # final, the last layer first (a data-parallel driver starts summing them across ranks)
    layer_done: object = None
    # called as share(batch, rng) -> (the rows of batch this process trains on, the generator its
    # draws come from): a data-parallel driver's share of each global batch
    share: object = None


def warm_up(net, optimizer, images_dtype, options=None):
    """Run every kernel a training step uses once, on tiny arrays of the run's dtypes, and return
    the seconds it took. A JIT backend compiles (or loads from its cache) per argument type, not
    per shape, so this moves all of that out of the first epoch's timing. options: a StepOptions,
    by default StepOptions()."""
    options = StepOptions() if options is None else options  # a fresh one: StepOptions is mutable
    started = time.perf_counter()
    scratch = MLP([3, 2, 2, 2], backend=net.backend, dtype=net.dtype, precision=net.precision, **net.spec())
    scratch_optimizer = Optimizer(scratch.params, optimizer.kind, weight_decay=0.1, backend=net.backend,
                                  copies=scratch.param_copies)
    # Not the run's generator, nor its after_backward hook: the scratch steps are no part of the run.
    scratch_options = dataclasses.replace(options, rng=np.random.default_rng(0), after_backward=None, share=None,
                                          layer_done=None)
    ws = scratch.workspace(2)
    images = np.zeros((4, 3), images_dtype)
    shift, scale = np.zeros(3, net.dtype), np.ones(3, net.dtype)
    scratch.kernels.gather_normalize(images, np.arange(2), shift, scale, ws.inputs)
    augmentation = options.augmentation
    if isinstance(augmentation, data.ComponentFlip):
        scratch_options.augmentation = data.ComponentFlip(np.ones(3, net.dtype))
    elif isinstance(augmentation, data.ProjectedAugmentation):
        scratch_options.augmentation = data.ProjectedAugmentation(
            data.Augmentation((1, 1, 3), **augmentation.augmentation.spec()), np.eye(3, dtype=net.dtype))
    elif augmentation is not None:
        scratch_options.augmentation = data.Augmentation((1, 1, 3), **augmentation.spec())
    scratch.kernels.softmax_cross_entropy(ws.logits, ws.labels, ws.deltas[-1])  # evaluation's loss
    scratch.forward(np.zeros((2, 3), net.dtype))  # evaluation's float32 passes, in any precision
    training_step(scratch, scratch_optimizer, images, np.zeros(4, np.int64), shift, scale, np.arange(2), 0.1,
                  scratch_options)
    return time.perf_counter() - started


def load_data(path, log, test_fraction=0.0, rng=0, image_size=None):
    """The dataset at `path`; with no path and nothing in the default folder, download CIFAR-10.
    `test_fraction`, `rng` and `image_size` are load_dataset's."""
    if path is None:
        default = data.default_data_path()
        try:
            data.find_dataset(default)
        except FastnetError:
            log(f"No dataset found in {default}/: downloading CIFAR-10 (170 MB) from {downloading.CIFAR10_URL}")
            data.download(to=default, log=log)
        path = default
    return data.load_dataset(path, test_fraction, rng, image_size)


def blas_libraries():
    """The BLAS and OpenMP libraries loaded, their thread counts and (OpenBLAS) kernel type: they
    decide how fast a run is, so every run records them."""
    return [{"library": lib["internal_api"], "version": lib.get("version"), "threads": lib["num_threads"],
             "architecture": lib.get("architecture"), "filepath": lib.get("filepath")} for lib in threadpool_info()]


def make_run_dir(out):
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", stamp)
        suffix = 1
        while os.path.exists(out):
            suffix += 1
            out = os.path.join("runs", f"{stamp}-{suffix}")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".fastnet-write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise FastnetError(f"cannot write to --out {out} ({exc.strerror}): pass a writable folder") from exc
    return out


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint must hold, besides the model and optimizer, for a
    resumed run to continue exactly as if it had never stopped."""

    epochs_done: int = 0
    step: int = 0                     # global steps taken
    order: np.ndarray | None = None   # this epoch's permutation, once drawn
    seen: int = 0                     # images of this epoch trained on so far
    loss_sum: float = 0.0             # this epoch's running sums, for its train loss and accuracy
    correct: int = 0
    seconds: float = 0.0              # this epoch's training time so far, over every session
    history: list = dataclasses.field(default_factory=list)  # the metrics of every finished epoch

    def state(self, rng):
        """The JSON-able part, with the generator's exact position."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "order"}
        return fields | {"rng": rng.bit_generator.state}

    @classmethod
    def from_checkpoint(cls, arrays, rng):
        fields = json.loads(str(arrays["progress"]))
        rng.bit_generator.state = fields.pop("rng")
        return cls(**fields, order=arrays.get("order"))


def data_fingerprint(labels, mean, std, input_size, num_classes):
    """Enough about the training data to tell, on resume, that it is the data the run began with."""
    return {"train_size": len(labels), "input_size": input_size, "num_classes": num_classes,
            "labels_crc32": zlib.crc32(np.ascontiguousarray(labels, np.int64).tobytes()),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def train(config, log=print, resume=False, after_backward=None, after_epoch=None, parallel=None):
    """Run the training that `config` describes; returns outcome(): the last epoch's metrics, the
    run folder, and the metrics of the epoch that model.npz keeps.

    With resume=True, continue the run in `config.out` from its checkpoint.npz. Everything a
    fresh run does first (validation split, initialisation) is repeated, then overwritten with the
    saved state, so both paths share one code path and a resumed run is bit-identical to one that
    never stopped. The hooks, and `parallel`, are TrainingRun's.
    """
    return TrainingRun(config, log, resume, after_backward, after_epoch, parallel).execute()


class TrainingRun:
    """One run of `fastnet train`, in named phases that execute() calls in order: prepare_data,
    build_model, restore, prepare_inputs, open_run_folder, run_epochs, finish. Other drivers run the
    same object with two hooks:

    after_backward(net, ws, loss, correct): after each step's backward pass, before clipping and the
        update; the gradients are in ws.grads; it may return the step's (loss, correct) instead (a
        data-parallel driver sums both, and the gradients, across processes here);
    after_epoch(summary): after each epoch's metrics, checkpoint and log line; returning True stops
        the run there, as finished (a sweep reports the validation accuracy here, and prunes).

    With `parallel` (a distributed.DataParallel), this process is one rank of a data-parallel run: its
    steps train on the rank's share of each batch and sum the gradients across ranks (the driver's
    share and after_backward), evaluation is split across the ranks, the ranks agree on when to stop,
    and only rank 0 logs and writes the run folder.
    """

    def __init__(self, config, log=print, resume=False, after_backward=None, after_epoch=None, parallel=None):
        self.config, self.resume, self.parallel = config, resume, parallel
        self.writes = parallel is None or parallel.writes
        self.log = log if self.writes else (lambda line: None)
        if parallel is not None:
            if after_backward is not None:
                raise ValueError("a data-parallel run's after_backward is its driver's")
            after_backward = parallel.after_backward
        self.after_backward, self.after_epoch = after_backward, after_epoch

    def execute(self):
        self.numerics = self.config.check()
        self.saved = load_resume_checkpoint(self.config.out, self.config.backend) if self.resume else None
        self.prepare_data()
        self.build_model()
        if self.saved is not None:
            self.restore()
            if self.progress.epochs_done >= self.config.epochs:
                self.log(f"the run in {self.config.out} already finished its {self.config.epochs} epochs: "
                         f"nothing to resume")
                return outcome(self.progress.history, self.config.out)
        if self.config.batch_size > len(self.train_images):
            raise FastnetError(f"--batch-size {self.config.batch_size} is larger than the {len(self.train_images)} "
                               f"training images: pass a smaller one")
        self.prepare_inputs()
        self.open_run_folder()
        self.run_epochs()
        return self.finish()

    def prepare_data(self):
        """The dataset, the validation split, the normalisation fitted on the training split, and the
        run's one generator (which the split draws from first)."""
        config = self.config
        self.rng = np.random.default_rng(config.seed)
        self.dataset = dataset = load_data(config.data, self.log, config.test_fraction, self.rng,
                                                  config.image_size)
        for warning in dataset.warnings:
            self.log(f"warning: {warning}")
        for note in dataset.notes:
            self.log(note)
        self.train_images, self.train_labels = dataset.train_images, dataset.train_labels
        self.val_images, self.val_labels = dataset.val_images, dataset.val_labels
        if config.val and self.val_images is not None:
            raise SettingError("val", f"{{setting}} holds out training images for validation, and {dataset.source} "
                                      f"has a val/ folder, which is validated on instead: drop {{setting}}")
        if config.val:
            self.train_images, self.train_labels, self.val_images, self.val_labels = data.split_validation(
                self.train_images, self.train_labels, config.val, self.rng)
        self.mean, self.std = data.channel_stats(self.train_images)
        self.shift, self.scale = normalizer(self.mean, self.std, dataset.input_size, self.train_images.dtype,
                                            config.dtype)
        self.fingerprint = data_fingerprint(self.train_labels, self.mean, self.std, dataset.input_size,
                                            dataset.num_classes)

    def build_model(self):
        """The network, its augmentation, optimizer and schedule, and a fresh Progress."""
        config, dataset = self.config, self.dataset
        self.sizes = [config.pca or dataset.input_size, *config.hidden, dataset.num_classes]
        self.net = net = MLP(self.sizes, backend=config.backend, dtype=config.dtype, seed=self.rng,
                             activation=config.activation, norm=config.norm, dropout=config.dropout,
                             precision=config.precision)
        augmentation = None
        if config.flip or config.translate or config.cutout or config.tta:
            if len(dataset.sample_shape) not in (2, 3):
                raise FastnetError(f"--flip, --translate, --cutout and --tta need images, but the samples of "
                                   f"{dataset.source} have shape {dataset.sample_shape}: drop those flags")
        if config.flip or config.translate or config.cutout:
            augmentation = data.Augmentation(dataset.sample_shape, config.flip, config.translate, config.cutout)
        hooks = self.parallel.step_hooks() if self.parallel else {"after_backward": self.after_backward}
        self.options = StepOptions(self.rng, augmentation, config.label_smoothing, config.clip, **hooks)
        self.optimizer = Optimizer(net.params, config.optimizer, momentum=config.momentum,
                                   weight_decay=config.weight_decay, backend=config.backend, copies=net.param_copies)
        steps_per_epoch = math.ceil(len(self.train_images) / config.batch_size)
        self.schedule = Schedule(config.schedule, config.lr, config.epochs * steps_per_epoch, config.warmup)
        self.progress = Progress()

    def restore(self):
        self.progress = restore(self.saved, self.net, self.optimizer, self.rng, self.fingerprint, self.config.out)

    def prepare_inputs(self):
        """What the steps read (the images, or their principal components with --pca), what
        evaluation uses (the test and validation images, projected once onto the components with
        --pca, on which the unfolded network runs every epoch), and the warm-up."""
        config, net, options = self.config, self.net, self.options
        self.flat_train = self.train_images.reshape(len(self.train_images), -1)
        self.train_shift, self.train_scale, self.projection, self.preprocess_seconds = self.shift, self.scale, None, 0.0
        if config.pca:
            # Components cannot follow shifts and cutout: with those, each batch is augmented as pixels and
            # then projected. Otherwise the images are projected once, and a flip is a change of signs.
            per_batch = bool(config.translate or config.cutout)
            mirrored = self.dataset.sample_shape if config.flip and not per_batch else None
            self.flat_train, self.projection, self.preprocess_seconds = principal_component_inputs(
                self.flat_train, self.shift, self.scale, config.pca, self.rng, net.kernels, self.saved, mirrored,
                project=not per_batch, whiten=config.whiten)
            if per_batch:
                options.augmentation = data.ProjectedAugmentation(options.augmentation, self.projection)
            else:
                self.train_shift = np.zeros(config.pca, net.dtype)
                self.train_scale = np.ones(config.pca, net.dtype)
                if config.flip:
                    options.augmentation = data.ComponentFlip(data.mirror_signs(self.projection, mirrored))
        self.evaluation_sets = {
            name: evaluation_inputs(images, self.dataset.sample_shape, self.shift, self.scale, self.projection,
                                    net.kernels, config.tta)
            for name, images in (("test", self.dataset.test_images), ("val", self.val_images)) if images is not None}
        self.startup_seconds = warm_up(net, self.optimizer, self.flat_train.dtype, options)

    def open_run_folder(self):
        """The run folder with config.json and the metrics so far, and the run's first log line."""
        config, net, progress, saved = self.config, self.net, self.progress, self.saved
        out = make_run_dir(config.out) if self.writes else None
        if self.parallel is not None:
            out = self.parallel.broadcast(out)  # rank 0 names a new run's folder
        self.out = out
        if self.writes:
            checkpoint.remove_temporaries(out)
        run_config = dataclasses.asdict(config) | {
            "backend": net.backend, "sizes": self.sizes, "out": out, "startup_seconds": self.startup_seconds,
            "data_source": self.dataset.source, "train_size": len(self.train_images), "blas": blas_libraries(),
            "parallelism": backends.parallelism(net.backend), "numerics": self.numerics,
            "data_fingerprint": self.fingerprint, "preprocess_seconds": self.preprocess_seconds,
            "distributed": self.parallel and self.parallel.describe()}
        run_config["started"] = datetime.now().isoformat(timespec="seconds")
        if saved is not None:
            run_config["started"] = saved.config.get("started", run_config["started"])
            run_config["resumed_at_step"] = saved.config.get("resumed_at_step", []) + [progress.step]
            before = (saved.config.get("backend"), saved.config.get("parallelism", {}).get("threads"))
            now = (net.backend, run_config["parallelism"]["threads"])
            any_threads = run_config["parallelism"].get("same_bits_on_any_thread_count", False)
            if before != now and None not in before and not (any_threads and before[0] == now[0]):
                self.log(f"note: the run trained on the {before[0]} backend with {before[1]} threads and resumes on "
                         f"{net.backend} with {run_config['parallelism']['threads']}: it will match a run that never "
                         f"stopped to float32 rounding, not bit for bit (products are split per thread)")
            ranks = [(c or {}).get("ranks", 1) for c in (saved.config.get("distributed"), run_config["distributed"])]
            if ranks[0] != ranks[1]:
                self.log(f"note: the run trained on {ranks[0]} ranks and resumes on {ranks[1]}: it will match a run "
                         f"that never stopped to float32 rounding, not bit for bit (the gradients are summed per rank)")
        self.run_config = run_config
        if self.writes:
            checkpoint.write_text_atomically(os.path.join(out, "config.json"), json.dumps(run_config, indent=2))
            write_metrics(out, progress.history)
        where = (f"resuming at epoch {progress.epochs_done + 1}, step {progress.step}" if saved is not None
                 else f"{len(self.train_images)} training images from {self.dataset.source}")
        inputs = (f" on the top {config.pca} principal components of {self.dataset.input_size} inputs"
                  if config.pca else "")
        if config.precision == "bf16":
            inputs += (f", bf16 mixed precision ({', '.join(self.numerics['instructions'])}; "
                       f"{self.numerics['gemm']})")
        if self.parallel is not None:
            inputs += f", data-parallel on {self.parallel.size} ranks"
        self.log(f"fastnet: {'-'.join(map(str, self.sizes))} MLP{inputs}, {net.backend} backend (kernels ready in "
                 f"{self.startup_seconds:.2f} s), {where}; writing to {out}/")

    def save_checkpoint(self):
        net, progress, dataset = self.net, self.progress, self.dataset
        if not all(np.isfinite(p).all() for p in net.params):
            raise diverged(progress.epochs_done + 1, progress.step, "a parameter is NaN or infinite", self.config.lr)
        if self.parallel is not None:
            self.parallel.check_same_parameters(net.params)
            if not self.writes:
                return
        extra = self.optimizer.state_arrays() | {"progress": np.array(json.dumps(progress.state(self.rng)))}
        if progress.order is not None:
            extra["order"] = progress.order
        checkpoint.save(os.path.join(self.out, CHECKPOINT), net, self.mean, self.std, dataset.sample_shape,
                        dataset.class_names, self.run_config, extra, self.projection)

    def run_epochs(self):
        """Epochs until the last, a stop request, or after_epoch returning True."""
        config, every = self.config, self.config.checkpoint_every
        with StopRequests() as stop:
            if self.parallel is not None:  # every rank stops at the step where any rank was asked to
                self.parallel.stop_requested = lambda: stop.signum is not None

            def pause(step):
                return self.stopping(stop) or (every is not None and step % every == 0)

            while self.progress.epochs_done < config.epochs:
                if self.train_one_epoch(pause, stop):
                    return

    def train_one_epoch(self, pause, stop):
        """The next epoch, or the rest of one a pause interrupted; True when the run should end here."""
        config, progress, net = self.config, self.progress, self.net
        epoch = progress.epochs_done + 1
        if progress.order is None:
            progress.order = self.rng.permutation(len(self.train_images))
        started = time.perf_counter()
        loss_sum, correct, seen = train_epoch(
            net, self.optimizer, self.schedule, self.flat_train, self.train_labels, self.train_shift,
            self.train_scale, progress.order[progress.seen:], config.batch_size, epoch, progress.step, pause,
            self.options)
        progress.seconds += time.perf_counter() - started
        progress.loss_sum += loss_sum
        progress.correct += correct
        progress.seen += seen
        progress.step += math.ceil(seen / config.batch_size)

        if progress.seen < len(progress.order):  # paused inside the epoch
            self.save_checkpoint()
            if self.stopping(stop):
                raise interrupted(stop.signum or signal.SIGTERM, progress, self.out, self.resume_command())
            return False

        summary = self.epoch_metrics(epoch)
        self.progress = dataclasses.replace(Progress(), epochs_done=epoch, step=progress.step,
                                            history=progress.history + [summary])
        self.save_checkpoint()
        if self.writes:
            write_metrics(self.out, self.progress.history)
            if best_epoch(self.progress.history) == epoch:
                checkpoint.save(os.path.join(self.out, MODEL), net, self.mean, self.std, self.dataset.sample_shape,
                                self.dataset.class_names, self.run_config, {"epoch": np.array(epoch)},
                                self.projection)
        self.log(format_epoch(summary, config.epochs))
        if self.stopping(stop) and self.progress.epochs_done < config.epochs:
            raise interrupted(stop.signum or signal.SIGTERM, self.progress, self.out, self.resume_command())
        return bool(self.after_epoch is not None and self.after_epoch(summary))

    def resume_command(self):
        if self.parallel is None:
            return "fastnet train"
        return f"mpirun -n {self.parallel.size} fastnet train --distributed"

    def stopping(self, stop):
        return stop.signum is not None if self.parallel is None else self.parallel.stopping

    def epoch_metrics(self, epoch):
        """The finished epoch's summary: training figures, test (and validation) loss and accuracy."""
        config, progress = self.config, self.progress
        test = self.evaluation("test", self.dataset.test_labels)
        summary = {"epoch": epoch, "train_loss": progress.loss_sum / progress.seen,
                   "train_acc": progress.correct / progress.seen, "test_loss": test[0],
                   "test_acc": test[1], "epoch_seconds": progress.seconds,
                   "samples_per_second": progress.seen / progress.seconds, "lr": self.schedule(progress.step - 1),
                   "train_seconds": self.preprocess_seconds + sum(m["epoch_seconds"] for m in progress.history)
                   + progress.seconds}
        if config.tta:
            summary["tta"] = config.tta  # the test (and validation) figures are of flip-averaged logits
        if self.val_images is not None:
            val = self.evaluation("val", self.val_labels)
            summary |= {"val_loss": val[0], "val_acc": val[1]}
        for name in ("train_loss", "test_loss", "val_loss"):
            if not math.isfinite(summary.get(name, 0.0)):
                raise diverged(epoch, progress.step, f"the {name.replace('_', ' ')} is {summary[name]}", config.lr)
        return summary

    def evaluation(self, name, labels):
        """(loss, accuracy) of the network on evaluation set `name`; split across the ranks of a
        data-parallel run."""
        inputs = self.evaluation_sets[name]
        if self.parallel is None:
            result = inputs.evaluate(self.net, labels)
            return result.loss, result.accuracy
        return self.parallel.split_evaluation(inputs, self.net, labels)

    def finish(self):
        for line in time_to_accuracy(self.progress.history):
            self.log(line)
        return outcome(self.progress.history, self.out)


def principal_component_inputs(images, shift, scale, count, rng, kernels, saved=None, mirrored=None, project=True,
                               whiten=False):
    """--pca: (the standardised images projected onto their top `count` principal components, or the
    images as they are when not `project`; the projection; the seconds it all took). With `mirrored`,
    the image shape, the components are fitted so that a flip only changes signs
    (data.principal_components); `whiten` scales them to unit variance. A resumed run (`saved`) keeps
    the components it began with, and its generator was saved past their draw. The seconds are part
    of training, which time to accuracy counts; a resumed run counts those of its first session."""
    started = time.perf_counter()
    projection = saved.projection if saved is not None else data.principal_components(
        images, shift, scale, count, rng, kernels, mirrored=mirrored, whiten=whiten)
    if project:
        images = data.project(images, shift, scale, projection, kernels)
    seconds = saved.config["preprocess_seconds"] if saved is not None else time.perf_counter() - started
    return images, projection, seconds


def outcome(history, out):
    """The last epoch's metrics, the run folder, and the metrics of the epoch model.npz holds."""
    return history[-1] | {"out": out, "kept": history[best_epoch(history) - 1]}


def best_epoch(history):
    """The epoch model.npz keeps: the first with the best validation accuracy when there is a
    validation split, else the last one. Choosing by test accuracy would tune on the test set."""
    if "val_acc" not in history[-1]:
        return len(history)
    return max(range(len(history)), key=lambda i: (history[i]["val_acc"], -i)) + 1


def time_to_accuracy(history, thresholds=(0.50, 0.55, 0.60, 0.65, 0.70)):
    """One line: after how many seconds of training (evaluation excluded; the --pca fit and
    projection included) the test accuracy first reached each threshold; empty when it reached none."""
    reached = []
    for threshold in thresholds:
        first = next((m for m in history if m["test_acc"] >= threshold), None)
        if first is not None:
            reached.append(f"{threshold:.0%} after {first['train_seconds']:.1f} s (epoch {first['epoch']})")
    return ["time to test accuracy: " + ", ".join(reached)] if reached else []


def load_resume_checkpoint(run_dir, backend):
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT} to resume from: pass the folder of a run "
                              f"that fastnet train started")
    saved = checkpoint.load(path, backend=backend)
    if "progress" not in saved.arrays:
        raise CheckpointError(f"{path} holds a model but no training progress: it cannot be resumed; "
                              f"start a new run with fastnet train")
    return saved


def resumed_config(run_dir, **overrides):
    """The TrainConfig of the run in `run_dir`, with `overrides` (data, backend, checkpoint_every:
    what may change without changing the numbers) applied."""
    saved = load_resume_checkpoint(run_dir, overrides.get("backend"))
    fields = {name: saved.config[name] for name in TrainConfig.__dataclass_fields__ if name in saved.config}
    fields["hidden"] = tuple(fields["hidden"])
    fields["out"] = run_dir
    return TrainConfig(**fields | {k: v for k, v in overrides.items() if v is not None})


def restore(saved, net, optimizer, rng, fingerprint, run_dir):
    """Load the parameters, optimizer state and progress of `saved` into this run's objects."""
    if saved.config.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"the data differs from the data the run in {run_dir} was trained on: pass "
                              f"--data with the original dataset")
    if [p.shape for p in saved.trained_net.params] != [p.shape for p in net.params] or \
            (saved.projection is None) == bool(saved.config.get("pca")):
        raise CheckpointError(f"the model in {run_dir} does not match its own config: the checkpoint is corrupt")
    for param, stored in zip(net.params, saved.trained_net.params, strict=True):
        param[...] = stored
    net.refresh_copies()
    optimizer.load_state_arrays(saved.arrays)
    return Progress.from_checkpoint(saved.arrays, rng)


def write_metrics(out, history):
    checkpoint.write_text_atomically(os.path.join(out, "metrics.jsonl"),
                                     "".join(json.dumps(summary) + "\n" for summary in history))


def diverged(epoch, step, what, lr):
    """Nothing is saved after this: the checkpoint on disk is the last one from before it happened."""
    return DivergenceError(f"training diverged at epoch {epoch}, step {step}: {what}; earlier checkpoints are "
                           f"kept; lower the learning rate (e.g. --lr {lr / 10:g})")


def interrupted(signum, progress, out, command="fastnet train"):
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name} at epoch "
                               f"{progress.epochs_done + 1}, step {progress.step}; checkpoint saved: "
                               f"continue with: {command} --resume {out}")


class StopRequests:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step
    instead of raising wherever the interpreter happens to be: mid-update, the parameters and the
    optimizer state could disagree, and the checkpoint written on the way out must be consistent.
    A second signal stops at once, for a user who does not want to wait."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            return self
        for signum in self.SIGNALS:
            # A signal the caller ignores (a background job's SIGINT, say) stays ignored.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


@np.errstate(over="ignore", invalid="ignore")  # divergence is reported below, in one line
def train_epoch(net, optimizer, schedule, images, labels, shift, scale, order, batch_size, epoch, step,
                pause=None, options=None):
    """Train on images[order] in minibatches, starting at global step `step`, each step as options (a
    StepOptions, by default StepOptions()) says.

    After each step, pause(steps taken so far) may return True to stop there. Returns (sum of batch
    losses times batch sizes, number of correct training predictions, number of images trained on).
    """
    options = StepOptions() if options is None else options  # a fresh one: StepOptions is mutable
    loss_sum, correct, seen = 0.0, 0, 0
    with tqdm(total=len(order), desc=f"epoch {epoch}", unit="img", leave=False,
              disable=not sys.stderr.isatty()) as bar, backends.follow_free_cores(net.backend) as follow:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss, batch_correct = training_step(net, optimizer, images, labels, shift, scale, batch,
                                                schedule(step), options)
            follow()
            if not math.isfinite(loss):
                raise diverged(epoch, step, f"the loss is {loss}", schedule.lr)
            loss_sum += loss * len(batch)
            correct += batch_correct
            step += 1
            seen += len(batch)
            bar.update(len(batch))
            if pause is not None and pause(step):
                break
    return loss_sum, correct, seen


def training_step(net, optimizer, images, labels, shift, scale, batch, lr, options):
    """One minibatch: gather (and augment) images[batch], forward, backward, update. Returns (mean
    loss, correct predictions); the parameters are updated even when the loss is not finite."""
    k, rng = net.kernels, options.rng
    if options.share is not None:
        batch, rng = options.share(batch, rng)
    ws = net.workspace(len(batch))
    if options.augmentation is not None:
        options.augmentation.apply(k, images, batch, rng, shift, scale, ws.inputs, ws.inputs16)
    else:
        k.gather_normalize(images, batch, shift, scale, ws.inputs, ws.inputs16)
    np.take(labels, batch, out=ws.labels)
    net.run_forward(ws, rng, rounded_inputs=True)
    correct = k.count_correct(ws.logits, ws.labels)
    loss = net.run_backward(ws, options.label_smoothing, options.layer_done)
    if options.after_backward is not None:
        loss, correct = options.after_backward(net, ws, loss, correct) or (loss, correct)
    if options.clip is not None:
        net.clip_grad_norm(ws.grads, options.clip)
    optimizer.step(ws.grads, lr)
    return loss, correct


def format_epoch(m, epochs):
    views = "+" + m["tta"] if "tta" in m else ""
    val = f"  val{views} {m['val_loss']:.3f} {m['val_acc']:6.2%}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}  train {m['train_loss']:.3f} {m['train_acc']:6.2%}"
            f"{val}  test{views} {m['test_loss']:.3f} {m['test_acc']:6.2%}  "
            f"{m['epoch_seconds']:5.1f} s  {m['samples_per_second']:,.0f} samples/s")
