"""Evaluation: a network's loss, accuracy and predictions on a set of images, in batches of
EVAL_BATCH, optionally on the mean logits of several views of each image (--tta: the image and its
mirror image, and with flip+shift each of those moved a pixel each way); and the standardisation
(shift, scale) that training, evaluation and prediction all apply to pixels.

Training evaluates every epoch through this module, and `fastnet evaluate`, `predict` and `report`
prepare their inputs the same way, so they find the very numbers that training reported.
"""

import dataclasses

import numpy as np

from fastnet import data, settings
from fastnet.errors import FastnetError

EVAL_BATCH = 1000
TTA = settings.TEST_TIME_AUGMENTATIONS  # --tta: None, "flip" or "flip+shift" (fastnet.settings)
# What each test-time augmentation averages, as the commands that evaluate or export with it say.
TTA_VIEWS = {"flip": "each averaged with its mirror image",
             "flip+shift": "each averaged over 10 views: it and its mirror image, as they are and shifted a pixel "
                           "up, down, left and right"}
# What each does to an image, for the message that refuses it on samples that are not images.
TTA_ACTIONS = {"flip": "mirrors images", "flip+shift": "mirrors and shifts images"}


def saved_tta(config, tta="run"):
    """The test-time augmentation to evaluate a saved run with: `tta`, or for "run" the run's own."""
    return config.get("tta") if tta == "run" else tta


def views_for(tta, sample_shape, samples="these samples have shape"):
    """The views (fastnet.data.View) of each image that `tta` averages over; `samples` words the
    refusal of a tta that moves pixels on samples without a height and a width."""
    if tta is not None and len(sample_shape) not in (2, 3):
        raise FastnetError(f"--tta {tta} {TTA_ACTIONS[tta]}, but {samples} {tuple(sample_shape)}: pass --tta none")
    return data.tta_views(tta)


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


def evaluate(net, images, labels, shift, scale, image_shape=None):
    """Mean loss, accuracy and predicted labels of `net` on uint8 or float images standardised by
    (shift, scale). `images` is an array of them, or for test-time augmentation a list of pairs
    (inputs, fastnet.data.View), each view of rows of `image_shape`; each image is then scored on the
    mean of its views' logits."""
    views = [(images, data.View())] if isinstance(images, np.ndarray) else images
    views = [(x.reshape(len(x), -1), view.gather(net.kernels, image_shape)) for x, view in views]
    count = len(views[0][0])
    k = net.kernels
    total_loss, predictions = 0.0, np.empty(count, np.int64)
    for start in range(0, count, EVAL_BATCH):
        stop = min(start + EVAL_BATCH, count)
        ws = net.workspace(stop - start, "fp32")  # the master weights: the numbers model.npz gives
        ws.labels[...] = labels[start:stop]
        logits = None
        for inputs, gather in views:
            gather(inputs, np.arange(start, stop), shift, scale, ws.inputs)
            if logits is None:  # run_forward's result is the workspace's, which the next view overwrites
                logits = net.run_forward(ws) if len(views) == 1 else net.run_forward(ws).copy()
            else:
                logits += net.run_forward(ws)
        if len(views) > 1:
            logits /= len(views)
        total_loss += k.softmax_cross_entropy(logits, ws.labels, ws.deltas[-1]) * (stop - start)
        predictions[start:stop] = logits.argmax(axis=1)
    accuracy = float(np.mean(predictions == labels)) if len(labels) else float("nan")
    return Evaluation(total_loss / max(count, 1), accuracy, predictions)


@dataclasses.dataclass
class EvaluationInputs:
    """What evaluate() reads of one set of images, prepared once: the network's inputs (the images,
    or for a --pca run their components) with the shift and scale that standardise them, as a list
    of pairs (inputs, fastnet.data.View), one per view of the test-time augmentation, of images of
    `image_shape`."""

    views: list
    shift: np.ndarray
    scale: np.ndarray
    image_shape: tuple

    def evaluate(self, net, labels):
        return evaluate(net, self.views, labels, self.shift, self.scale, self.image_shape)

    def rows(self, start, stop):
        return EvaluationInputs([(x[start:stop], view) for x, view in self.views], self.shift, self.scale,
                                self.image_shape)


def evaluation_inputs(images, sample_shape, shift, scale, projection=None, kernels=None, tta=None):
    """The EvaluationInputs of `images` for a network on pixels standardised by (shift, scale), or with
    `projection` for one on their components (evaluate the network as it was trained, not the one
    that folds the projection in: a --pca run evaluates its components once, so each epoch's test
    costs the network alone). With a test-time augmentation `tta`, the views of the pixels are made
    as each batch is read; for a --pca run each view is projected once, here. `fastnet evaluate`
    prepares them the same way, so it finds the very numbers that training reported."""
    flat = images.reshape(len(images), -1)
    views = views_for(tta, sample_shape)
    if projection is None:
        return EvaluationInputs([(flat, view) for view in views], shift, scale, tuple(sample_shape))
    count = projection.shape[1]
    # Each view's components are the network's inputs as they are: the view was made before projecting.
    components = [(data.project(flat, shift, scale, projection, kernels, gather=view.gather(kernels, sample_shape)),
                   data.View()) for view in views]
    return EvaluationInputs(components, np.zeros(count, projection.dtype), np.ones(count, projection.dtype),
                            tuple(sample_shape))
