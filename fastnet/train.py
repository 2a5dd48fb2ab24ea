"""Training: one run of `fastnet train`, from the data to the last epoch's metrics.

A run draws every random number from one np.random.Generator seeded by `config.seed`: first the
validation split (when asked for), then the initial weights, then the images the --pca components
are fitted to, then one permutation per epoch, and within it each step's augmentations and one
dropout key per hidden layer (the kernels' draw_uniform turns a key into the layer's numbers).

The parts live in their own modules: the settings and recipes (fastnet.config), the step and the
epoch (fastnet.step), evaluation (fastnet.evaluation), the run folder and resuming
(fastnet.run_folder), stop requests (fastnet.signals), how the run's processes share the work
(distributed.SingleProcess or distributed.DataParallel), and the weight average that --ema evaluates
and saves in place of the trained network (fastnet.averaging).
"""

import dataclasses
import errno
import json
import math
import os
import signal
import time
from datetime import datetime

import numpy as np
from threadpoolctl import threadpool_info

from fastnet import backends, checkpoint, data, distributed, storage
from fastnet.averaging import WeightAverage
from fastnet.data import downloading
from fastnet.errors import FastnetError, SettingError, StorageError
from fastnet.evaluation import evaluation_inputs, normalizer
from fastnet.loss_watch import LossWatch
from fastnet.model import MLP
from fastnet.optim import Optimizer, Schedule
from fastnet.run_folder import (
    CHECKPOINT,
    MODEL,
    Progress,
    best_epoch,
    check_same_data,
    checkpoint_stamp,
    claim_run_dir,
    data_fingerprint,
    load_resume_checkpoint,
    make_run_dir,
    outcome,
    release_run_dir,
    restore_state,
    time_to_accuracy,
    write_metrics,
)
from fastnet.signals import StopRequests, interrupted
from fastnet.step import StepOptions, diverged, train_epoch, warm_up


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
    and only rank 0 logs and writes the run folder. Without it, a distributed.SingleProcess does the
    same for one process (each part trivial), so no phase branches on which it is.

    A driver that holds its data in memory (fastnet.sklearn's estimator) passes it as `dataset` (a
    data.Dataset, whose test split may be None) in place of config.data; `statistics(train_images)`
    fits the (mean, std) that inputs are standardised with (data.feature_stats per feature, or the
    kept ones of a warm start); with folder=False the run writes nothing to disk. Such a driver calls
    prepare() once, then run_epochs(until) for as many epochs as it wants, train_on() between them
    to change what they train on.
    """

    def __init__(self, config, log=print, resume=False, after_backward=None, after_epoch=None, parallel=None,
                 dataset=None, statistics=data.channel_stats, folder=True):
        if parallel is not None and after_backward is not None:
            raise ValueError("a data-parallel run's after_backward is its driver's")
        self.config, self.resume, self.after_epoch = config, resume, after_epoch
        self.given_dataset, self.statistics = dataset, statistics
        self.processes = parallel if parallel is not None else distributed.SingleProcess(after_backward)
        self.writes = self.processes.writes and folder
        self.log = log if self.processes.writes else (lambda line: None)
        self.lock = None
        self.out = config.out  # the run folder: open_run_folder names a new one
        self.checkpoint_step = None  # the step of the checkpoint in the run folder, once there is one

    def execute(self):
        try:
            if not self.prepare():
                return outcome(self.progress.history, self.config.out)
            self.run_epochs()
            return self.finish()
        except StorageError as exc:
            if self.checkpoint_step is None:
                raise  # nothing to resume: the same command starts the run again
            raise exc.continued(f"continue from the checkpoint at step {self.checkpoint_step} with: "
                                f"{self.processes.resume_command} --resume {self.out}") from exc
        finally:
            self.close()

    def close(self):
        """Let another fastnet train have the run folder (a sweep's worker runs trial after trial)."""
        release_run_dir(self.lock)
        self.lock = None

    def prepare(self):
        """Every phase before the epochs; False when a resumed run has none left to train."""
        self.numerics = self.config.check()
        self.config = dataclasses.replace(self.config, precision=self.numerics["precision"])  # "auto" decided
        self.resumed_stamp = checkpoint_stamp(self.config.out) if self.resume else None
        self.saved = load_resume_checkpoint(self.config.out, self.config.backend) if self.resume else None
        self.prepare_data()
        if self.saved is not None:
            check_same_data(self.saved, self.fingerprint, self.config.out)
        self.config.check_against_data(self.dataset.sample_shape, self.dataset.source, len(self.train_images))
        self.build_model()
        if self.saved is not None:
            self.restore()
            if self.progress.epochs_done >= self.config.epochs:
                self.log(f"the run in {self.config.out} already finished its {self.config.epochs} epochs: "
                         f"nothing to resume")
                return False
        self.prepare_inputs()
        self.open_run_folder()
        return True

    def prepare_data(self):
        """The dataset (the given one, or config.data's), the validation split, the normalisation
        fitted on the training split, and the run's one generator (which the split draws from first)."""
        config = self.config
        self.rng = np.random.default_rng(config.seed)
        dataset = self.given_dataset
        if dataset is None:
            dataset = load_data(config.data, self.log, config.test_fraction, self.rng, config.image_size)
        self.dataset = dataset
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
        self.mean, self.std = self.statistics(self.train_images)
        self.shift, self.scale = normalizer(self.mean, self.std, dataset.input_size, self.train_images.dtype,
                                            config.dtype)
        self.fingerprint = data_fingerprint(self.train_labels, self.mean, self.std, dataset.input_size,
                                            dataset.num_classes)

    @property
    def model(self):
        """The network the run evaluates and saves as model.npz: the weight average with --ema, else
        the network it trains."""
        return self.average.model if self.average is not None else self.net

    def build_model(self):
        """The network, its weight average (--ema), augmentation, optimizer and schedule, and a fresh
        Progress."""
        config, dataset = self.config, self.dataset
        self.sizes = [config.pca or dataset.input_size, *config.hidden, dataset.num_classes]
        self.net = net = MLP(self.sizes, backend=config.backend, dtype=config.dtype, seed=self.rng,
                             activation=config.activation, norm=config.norm, dropout=config.dropout,
                             precision=config.precision)
        augmentation = None
        if config.flip or config.translate or config.cutout:
            augmentation = data.Augmentation(dataset.sample_shape, config.flip, config.translate, config.cutout)
        self.average = WeightAverage(net, config.ema) if config.ema is not None else None
        self.options = StepOptions(self.rng, augmentation, config.label_smoothing, config.clip,
                                   average=self.average, **self.processes.step_hooks())
        self.optimizer = Optimizer(net.params, config.optimizer, momentum=config.momentum,
                                   weight_decay=config.weight_decay, backend=config.backend, copies=net.param_copies)
        steps_per_epoch = math.ceil(len(self.train_images) / config.batch_size)
        self.schedule = Schedule(config.schedule, config.lr, config.epochs * steps_per_epoch, config.warmup)
        self.progress = Progress(watch=LossWatch.for_run(config.batch_size, steps_per_epoch, dataset.num_classes))

    def restore(self):
        fresh = self.progress.watch
        self.progress = restore_state(self.saved, self.net, self.optimizer, self.rng, self.config.out, self.average)
        self.checkpoint_step = self.progress.step
        if self.progress.watch is None:  # a checkpoint from before the watch: it follows the loss from here
            self.progress.watch = fresh

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
        if self.writes:
            self.lock = claim_run_dir(out, resuming=self.resume)
            if self.resume and checkpoint_stamp(out) != self.resumed_stamp:
                # Another run wrote the folder while this one loaded: continuing from what it loaded would
                # overwrite the newer epochs with older ones.
                raise FastnetError(f"another fastnet train wrote {out} while this one was starting: run the same "
                                   f"command again to resume from where that one stopped")
        out = self.processes.broadcast(out)  # rank 0 names a new run's folder
        self.out = out
        if self.writes:
            storage.remove_temporaries(out)
        run_config = dataclasses.asdict(config) | {
            "backend": net.backend, "sizes": self.sizes, "out": out, "startup_seconds": self.startup_seconds,
            "data_source": self.dataset.source, "train_size": len(self.train_images), "blas": blas_libraries(),
            "parallelism": backends.parallelism(net.backend), "numerics": self.numerics,
            "data_fingerprint": self.fingerprint, "preprocess_seconds": self.preprocess_seconds,
            "distributed": self.processes.describe()}
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
            storage.write_text_atomically(os.path.join(out, "config.json"), json.dumps(run_config, indent=2))
            write_metrics(out, progress.history)
        where = (f"resuming at epoch {progress.epochs_done + 1}, step {progress.step}" if saved is not None
                 else f"{len(self.train_images)} training images from {self.dataset.source}")
        inputs = (f" on the top {config.pca} principal components of {self.dataset.input_size} inputs"
                  if config.pca else "")
        if config.precision == "bf16":
            inputs += (f", bf16 mixed precision ({', '.join(self.numerics['instructions'])}; "
                       f"{self.numerics['gemm']})")
        inputs += self.processes.headline
        writing = f"; writing to {out}/" if out is not None else ""
        self.log(f"fastnet: {'-'.join(map(str, self.sizes))} MLP{inputs}, {net.backend} backend (kernels ready in "
                 f"{self.startup_seconds:.2f} s), {where}{writing}")

    def save_checkpoint(self, finished_epoch=None):
        """checkpoint.npz; at the end of `finished_epoch`, metrics.jsonl and (when the epoch is the
        best) model.npz first. The checkpoint comes last, so no file is ever behind it: what a
        failed write or a crash leaves undone, the run resumed from the checkpoint writes again."""
        net, progress = self.net, self.progress
        if not all(np.isfinite(p).all() for p in net.params):
            raise diverged(progress.epochs_done + 1, progress.step, "a parameter is NaN or infinite", self.config.lr)
        self.processes.check_same_parameters(net.params + (self.model.params if self.average is not None else []))
        if not self.writes:
            return
        try:
            self.write_checkpoint(finished_epoch)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not os.path.isdir(self.out):
                self.checkpoint_step = None  # gone with its folder: nothing to resume
                raise StorageError(f"cannot save to the --out folder {self.out}: it was removed during the run, with "
                                   f"all the run had saved", "train again into a folder that nothing else removes"
                                   ) from exc
            raise storage.unwritable_out(self.out, self.out, exc) from exc

    def write_checkpoint(self, finished_epoch):
        """save_checkpoint's files, in its order, each written whole or not at all (storage.write_atomically)."""
        net, progress, dataset = self.net, self.progress, self.dataset
        if finished_epoch is not None:
            write_metrics(self.out, progress.history)
            if best_epoch(progress.history) == finished_epoch:
                checkpoint.save(os.path.join(self.out, MODEL), self.model, self.mean, self.std, dataset.sample_shape,
                                dataset.class_names, self.run_config, {"epoch": np.array(finished_epoch)},
                                self.projection)
        extra = self.optimizer.state_arrays() | {"progress": np.array(json.dumps(progress.state(self.rng)))}
        if self.average is not None:
            extra |= self.average.state_arrays()
        if progress.order is not None:
            extra["order"] = progress.order
        checkpoint.save(os.path.join(self.out, CHECKPOINT), net, self.mean, self.std, dataset.sample_shape,
                        dataset.class_names, self.run_config, extra, self.projection)
        self.checkpoint_step = progress.step

    def run_epochs(self, until=None):
        """Epochs until epoch `until` (None: the last), a stop request, or after_epoch returning True."""
        config, every = self.config, self.config.checkpoint_every
        until = config.epochs if until is None else until
        with StopRequests() as stop:
            self.processes.stop_requested = lambda: stop.signum is not None

            def pause(step):
                return self.processes.stopping or (every is not None and step % every == 0)

            while self.progress.epochs_done < until:
                if self.train_one_epoch(pause, stop):
                    return

    def train_on(self, images, labels):
        """Train the next epochs on these samples (of the run's sample shape, labels below its class
        count) instead: the standardisation, network, optimizer and schedule stay the run's. An epoch
        a stop request cut short starts afresh on them."""
        if self.config.pca:
            raise FastnetError("a run on principal components trains on the images it projected: it cannot "
                               "change them")
        self.train_images, self.train_labels = images, labels
        self.flat_train = images.reshape(len(images), -1)
        self.progress = dataclasses.replace(Progress(), epochs_done=self.progress.epochs_done,
                                            step=self.progress.step, history=self.progress.history,
                                            watch=self.progress.watch)

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
            self.options, progress.watch)
        progress.seconds += time.perf_counter() - started
        progress.loss_sum += loss_sum
        progress.correct += correct
        progress.seen += seen
        progress.step += math.ceil(seen / config.batch_size)

        if progress.seen < len(progress.order):  # paused inside the epoch
            self.save_checkpoint()
            if self.processes.stopping:
                raise interrupted(stop.signum or signal.SIGTERM, progress, self.out, self.processes.resume_command)
            return False

        summary = self.epoch_metrics(epoch)
        # Taken before the checkpoint, which records that it was given: a resumed run does not repeat it.
        warning = progress.watch.warning(epoch, config.lr, config.batch_size, len(self.train_images))
        self.progress = dataclasses.replace(Progress(), epochs_done=epoch, step=progress.step,
                                            history=progress.history + [summary], watch=progress.watch)
        self.save_checkpoint(finished_epoch=epoch)
        self.log(format_epoch(summary, config.epochs))
        if warning is not None:
            self.log(warning)
        if self.processes.stopping and self.progress.epochs_done < config.epochs:
            raise interrupted(stop.signum or signal.SIGTERM, self.progress, self.out, self.processes.resume_command)
        return bool(self.after_epoch is not None and self.after_epoch(summary))

    def epoch_metrics(self, epoch):
        """The finished epoch's summary: training figures, test (and validation) loss and accuracy."""
        config, progress = self.config, self.progress
        summary = {"epoch": epoch, "train_loss": progress.loss_sum / progress.seen,
                   "train_acc": progress.correct / progress.seen}
        evaluated = epoch % config.eval_every == 0 or epoch == config.epochs
        if evaluated and "test" in self.evaluation_sets:  # not of a driver's data without a test split
            test = self.evaluation("test", self.dataset.test_labels)
            summary |= {"test_loss": test[0], "test_acc": test[1]}
        summary |= {"epoch_seconds": progress.seconds, "samples_per_second": progress.seen / progress.seconds,
                    "lr": self.schedule(progress.step - 1),
                    "train_seconds": self.preprocess_seconds + sum(m["epoch_seconds"] for m in progress.history)
                    + progress.seconds}
        if config.tta and evaluated:
            summary["tta"] = config.tta  # the test (and validation) figures are of the views' mean logits
        if config.ema is not None and evaluated:
            summary["ema"] = config.ema  # ... and of the weight average
        if evaluated and self.val_images is not None:
            val = self.evaluation("val", self.val_labels)
            summary |= {"val_loss": val[0], "val_acc": val[1]}
        for name in ("train_loss", "test_loss", "val_loss"):
            if not math.isfinite(summary.get(name, 0.0)):
                raise diverged(epoch, progress.step, f"the {name.replace('_', ' ')} is {summary[name]}", config.lr)
        return summary

    def evaluation(self, name, labels):
        """(loss, accuracy) of the model (the weight average with --ema) on evaluation set `name`; split
        across the ranks of a data-parallel run."""
        return self.processes.split_evaluation(self.evaluation_sets[name], self.model, labels)

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


def format_epoch(m, epochs):
    """The epoch's line; "test+flip" for figures on flip-averaged logits (--tta flip), "test(ema)" for
    figures of the weight average (--ema)."""
    views = ("+" + m["tta"] if "tta" in m else "") + ("(ema)" if "ema" in m else "")
    val = f"  val{views} {m['val_loss']:.3f} {m['val_acc']:6.2%}" if "val_acc" in m else ""
    test = f"  test{views} {m['test_loss']:.3f} {m['test_acc']:6.2%}" if "test_acc" in m else ""
    return (f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}  train {m['train_loss']:.3f} {m['train_acc']:6.2%}"
            f"{val}{test}  {m['epoch_seconds']:5.1f} s  {m['samples_per_second']:,.0f} samples/s")
