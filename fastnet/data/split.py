"""The validation split: the training samples held out to choose the epoch by (fastnet train --val)."""

from __future__ import annotations

import numpy as np

from fastnet.errors import DataError


def split_validation(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``count`` samples, each class in proportion to its size and drawn by ``rng`` within it,
    as scikit-learn's classifiers split off their validation samples: a split that happened to miss a
    small class would choose the epoch without it. As the test split of an image tree, it never takes
    a class's last sample, which stays to be trained on. Returns (train_images, train_labels,
    val_images, val_labels)."""
    total = len(images)
    if len(labels) != total:
        raise DataError(f"cannot split {total} images with {len(labels)} labels: pass matching arrays")
    _, sizes = np.unique(labels, return_counts=True)
    most = most_held_out(labels)
    if not most:
        raise DataError(f"--val {count} finds nothing to hold out: each of the {total} classes of the training set "
                        "has one sample, which it keeps to be trained on; pass --val 0")
    if not isinstance(count, (int, np.integer)) or not 0 < count <= most:
        raise DataError(f"--val {count} must be between 1 and {most}: the training set has {total} samples in "
                        f"{len(sizes)} classes, and each class keeps one to be trained on; pass a smaller one")
    quotas = class_quotas(sizes, count, rng)
    by_class = np.lexsort((rng.random(total), labels))  # each class's samples together, in random order
    rank = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # a sample's place within its class
    held = np.zeros(total, bool)
    held[by_class[rank < np.repeat(quotas, sizes)]] = True
    # A mask keeps both parts in their original order, so epochs see a stable sequence for a seed.
    return (np.ascontiguousarray(images[~held]), np.ascontiguousarray(labels[~held]),
            np.ascontiguousarray(images[held]), np.ascontiguousarray(labels[held]))


def most_held_out(labels: np.ndarray) -> int:
    """The most samples of `labels` that a validation split may hold out: all but one of each class."""
    return len(labels) - len(np.unique(labels))


def class_quotas(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """How many of each class's ``sizes`` samples to hold out so that they sum to ``count``, at most
    ``sizes.sum() - len(sizes)``: each share rounded down, then one more at a time for the classes whose
    shares lost most to the rounding, equal losses in an order drawn by ``rng``, passing over a class
    left with one sample. Integer arithmetic, so that no share is misjudged by a rounding error."""
    # count < sizes.sum(), so no share rounded down takes a class's last sample: only the ones added can.
    quotas, lost = np.divmod(sizes.astype(np.int64) * count, sizes.sum())
    order = np.lexsort((rng.permutation(len(sizes)), -lost))
    short = count - int(quotas.sum())
    while short:
        open_classes = order[quotas[order] < sizes[order] - 1][:short]
        quotas[open_classes] += 1
        short -= len(open_classes)
    return quotas
