"""Training and evaluation: the epoch loop, its metrics, and what a run writes to disk.

A run draws every random number from one np.random.Generator seeded by `config.seed`: first the
validation split (when asked for), then the initial weights, then one permutation per epoch.

A run's folder holds config.json, metrics.jsonl (one JSON object per epoch) and model.npz (rewritten
after every epoch).
"""

import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime

import numpy as np
from threadpoolctl import threadpool_info
from tqdm import tqdm

from fastnet import backends, checkpoint, data
from fastnet.errors import FastnetError
from fastnet.model import MLP
from fastnet.optim import OPTIMIZERS, SCHEDULES, Optimizer, Schedule

EVAL_BATCH = 1000


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
    out: str | None = None
    dtype: str = "float32"

    def check(self):
        """Raise FastnetError for settings no run can use."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FastnetError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FastnetError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise FastnetError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise FastnetError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.warmup is not None and not 0 <= self.warmup < 1:
            raise FastnetError(f"--warmup is a fraction of the run in [0, 1), got {self.warmup}")
        if not self.hidden or min(self.hidden) < 1:
            raise FastnetError(f"--hidden must be a comma list of positive widths, got {self.hidden}")
        if self.optimizer not in OPTIMIZERS:
            raise FastnetError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise FastnetError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.val < 0:
            raise FastnetError(f"--val must be 0 or more, got {self.val}")
        backends.get(self.backend)


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


def evaluate(net, images, labels, shift, scale):
    """Mean loss, accuracy and predicted labels of `net` on uint8 or float images."""
    images = images.reshape(len(images), -1)
    k = net.kernels
    total_loss, predictions = 0.0, np.empty(len(images), np.int64)
    for start in range(0, len(images), EVAL_BATCH):
        stop = min(start + EVAL_BATCH, len(images))
        ws = net.workspace(stop - start)
        k.gather_normalize(images, np.arange(start, stop), shift, scale, ws.inputs)
        ws.labels[...] = labels[start:stop]
        logits = net.run_forward(ws)
        total_loss += k.softmax_cross_entropy(logits, ws.labels, ws.deltas[-1]) * (stop - start)
        predictions[start:stop] = logits.argmax(axis=1)
    accuracy = float(np.mean(predictions == labels)) if len(labels) else float("nan")
    return Evaluation(total_loss / max(len(images), 1), accuracy, predictions)


def warm_up(net, optimizer, images_dtype):
    """Run every kernel a training step uses once, on tiny arrays of the run's dtypes, and return
    the seconds it took. A JIT backend compiles (or loads from its cache) per argument type, not
    per shape, so this moves all of that out of the first epoch's timing."""
    started = time.perf_counter()
    scratch = MLP([3, 2, 2, 2], backend=net.backend, dtype=net.dtype)
    scratch_optimizer = Optimizer(scratch.params, optimizer.kind, weight_decay=0.1, backend=net.backend)
    ws = scratch.workspace(2)
    images = np.zeros((4, 3), images_dtype)
    shift, scale = np.zeros(3, net.dtype), np.ones(3, net.dtype)
    scratch.kernels.gather_normalize(images, np.arange(2), shift, scale, ws.inputs)
    scratch.run_forward(ws)
    scratch.kernels.count_correct(ws.logits, ws.labels)
    scratch.run_backward(ws)
    scratch_optimizer.step(ws.grads, 0.1)
    return time.perf_counter() - started


def load_data(path, log):
    """The dataset at `path`; with no path and nothing in the default folder, download CIFAR-10."""
    if path is None:
        default = data.default_data_path()
        try:
            data.find_dataset(default)
        except FastnetError:
            log(f"No dataset found in {default}/: downloading CIFAR-10 (170 MB) from {data.CIFAR10_URL}")
            data.download(to=default, url=data.CIFAR10_URL, md5=data.CIFAR10_MD5)
        path = default
    return data.load_dataset(path)


def blas_libraries():
    """The BLAS and OpenMP libraries loaded, their thread counts and (OpenBLAS) kernel type: they
    decide how fast a run is, so every run records them."""
    return [{"library": lib["internal_api"], "version": lib.get("version"), "threads": lib["num_threads"],
             "architecture": lib.get("architecture")} for lib in threadpool_info()]


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


def train(config, log=print):
    """Run the training that `config` describes; returns the summary of the last epoch."""
    config.check()
    dataset = load_data(config.data, log)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    rng = np.random.default_rng(config.seed)

    train_images, train_labels = dataset.train_images, dataset.train_labels
    val_images = val_labels = None
    if config.val:
        train_images, train_labels, val_images, val_labels = data.split_validation(
            train_images, train_labels, config.val, rng)
    if config.batch_size > len(train_images):
        raise FastnetError(f"--batch-size {config.batch_size} is larger than the {len(train_images)} "
                           f"training images: pass a smaller one")

    mean, std = data.channel_stats(train_images)
    shift, scale = normalizer(mean, std, dataset.input_size, train_images.dtype, config.dtype)
    sizes = [dataset.input_size, *config.hidden, dataset.num_classes]
    net = MLP(sizes, backend=config.backend, dtype=config.dtype, seed=rng)
    optimizer = Optimizer(net.params, config.optimizer, momentum=config.momentum,
                          weight_decay=config.weight_decay, backend=config.backend)
    steps_per_epoch = math.ceil(len(train_images) / config.batch_size)
    schedule = Schedule(config.schedule, config.lr, config.epochs * steps_per_epoch, config.warmup)

    startup_seconds = warm_up(net, optimizer, train_images.dtype)

    out = make_run_dir(config.out)
    run_config = dataclasses.asdict(config) | {
        "backend": net.backend, "sizes": sizes, "out": out, "startup_seconds": startup_seconds,
        "data_source": dataset.source, "train_size": len(train_images), "blas": blas_libraries()}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2)
    log(f"fastnet: {'-'.join(map(str, sizes))} MLP, {net.backend} backend (kernels ready in "
        f"{startup_seconds:.2f} s), {len(train_images)} training images from {dataset.source}; "
        f"writing to {out}/")

    flat_train = train_images.reshape(len(train_images), -1)
    metrics_path = os.path.join(out, "metrics.jsonl")
    open(metrics_path, "w").close()
    step = 0
    summary = {}
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(train_images))
        started = time.perf_counter()
        loss_sum, correct = train_epoch(net, optimizer, schedule, flat_train, train_labels, shift, scale,
                                        order, config.batch_size, epoch, step)
        seconds = time.perf_counter() - started
        step += steps_per_epoch

        test = evaluate(net, dataset.test_images, dataset.test_labels, shift, scale)
        summary = {"epoch": epoch, "train_loss": loss_sum / len(order), "train_acc": correct / len(order),
                   "test_loss": test.loss, "test_acc": test.accuracy, "epoch_seconds": seconds,
                   "samples_per_second": len(order) / seconds, "lr": schedule(step - 1)}
        if val_images is not None:
            val = evaluate(net, val_images, val_labels, shift, scale)
            summary |= {"val_loss": val.loss, "val_acc": val.accuracy}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        checkpoint.save(os.path.join(out, "model.npz"), net, mean, std, dataset.sample_shape,
                        dataset.class_names, run_config,
                        extra=optimizer.state_arrays() | {"epoch": np.array(epoch), "step": np.array(step)})
        log(format_epoch(summary, config.epochs))
    return summary | {"out": out}


@np.errstate(over="ignore", invalid="ignore")  # divergence is reported below, in one line
def train_epoch(net, optimizer, schedule, images, labels, shift, scale, order, batch_size, epoch, step):
    """One pass over images[order] in minibatches; returns (sum of batch losses times batch sizes,
    number of correct training predictions). `step` is the global step the epoch starts at."""
    k = net.kernels
    loss_sum, correct = 0.0, 0
    with tqdm(total=len(order), desc=f"epoch {epoch}", unit="img", leave=False,
              disable=not sys.stderr.isatty()) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ws = net.workspace(len(batch))
            k.gather_normalize(images, batch, shift, scale, ws.inputs)
            np.take(labels, batch, out=ws.labels)
            net.run_forward(ws)
            correct += k.count_correct(ws.logits, ws.labels)
            loss = net.run_backward(ws)
            if not math.isfinite(loss):
                raise FastnetError(f"training diverged at epoch {epoch}, step {step}: the loss is {loss}; "
                                   f"lower the learning rate (e.g. --lr {schedule.lr / 10:g})")
            loss_sum += loss * len(batch)
            optimizer.step(ws.grads, schedule(step))
            step += 1
            progress.update(len(batch))
    return loss_sum, correct


def format_epoch(m, epochs):
    val = f"  val {m['val_loss']:.3f} {m['val_acc']:6.2%}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}  train {m['train_loss']:.3f} {m['train_acc']:6.2%}"
            f"{val}  test {m['test_loss']:.3f} {m['test_acc']:6.2%}  "
            f"{m['epoch_seconds']:5.1f} s  {m['samples_per_second']:,.0f} samples/s")
