"""Evaluation: a network's loss, accuracy and predictions on a set of images, in batches of
EVAL_BATCH, optionally on the mean logits of each image and its mirror image (--tta flip); and the
standardisation (shift, scale) that training, evaluation and prediction all apply to pixels.

Training evaluates every epoch through this module, and `fastnet evaluate`, `predict` and `report`
prepare their inputs the same way, so they find the very numbers that training reported.
"""

import dataclasses

import numpy as np

from fastnet import data, settings
from fastnet.errors import FastnetError

EVAL_BATCH = 1000
TTA = settings.TEST_TIME_AUGMENTATIONS  # --tta: None, or "flip" (fastnet.settings)


def saved_tta(config, tta="run"):
    """The test-time augmentation to evaluate a saved run with: `tta`, or for "run" the run's own."""
    return config.get("tta") if tta == "run" else tta


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
