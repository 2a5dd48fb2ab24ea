"""The training step and the epoch: gather (and augment) a minibatch, forward, backward, update; and
the loop over an epoch's minibatches that every trainer runs (`fastnet train`, the sweep's trials,
each rank of a data-parallel run, `fastnet bench` and tools/compare_workloads.py)."""

import dataclasses
import math
import sys
import time

import numpy as np
from tqdm import tqdm

from fastnet import backends, data
from fastnet.averaging import WeightAverage
from fastnet.errors import DivergenceError
from fastnet.model import MLP
from fastnet.optim import Optimizer


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
    # an averaging.WeightAverage to move after every update (--ema); None: no average
    average: object = None


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
    if options.average is not None:
        options.average.update(optimizer.steps_taken)
    return loss, correct


@np.errstate(over="ignore", invalid="ignore")  # divergence is reported below, in one line
def train_epoch(net, optimizer, schedule, images, labels, shift, scale, order, batch_size, epoch, step,
                pause=None, options=None, watch=None):
    """Train on images[order] in minibatches, starting at global step `step`, each step as options (a
    StepOptions, by default StepOptions()) says.

    After each step, watch.see(the step's loss) follows the loss (a loss_watch.LossWatch), and
    pause(steps taken so far) may return True to stop there. Returns (sum of batch
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
            if watch is not None:
                watch.see(loss)
            loss_sum += loss * len(batch)
            correct += batch_correct
            step += 1
            seen += len(batch)
            bar.update(len(batch))
            if pause is not None and pause(step):
                break
    return loss_sum, correct, seen


def diverged(epoch, step, what, lr):
    """Nothing is saved after this: the checkpoint on disk is the last one from before it happened."""
    return DivergenceError(f"training diverged at epoch {epoch}, step {step}: {what}; earlier checkpoints are "
                           f"kept; lower the learning rate (e.g. --lr {lr / 10:g})")


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
                                          layer_done=None, average=None)
    if options.average is not None:  # the scratch network's own, which compiles the average's kernel
        scratch_options.average = WeightAverage(scratch, options.average.decay)
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
