"""The validation split: the training samples held out to choose the epoch by (fastnet train --val)."""

from __future__ import annotations

import numpy as np

from fastnet.errors import DataError


def split_validation(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``count`` samples, each class in proportion to its size and drawn by ``rng`` within it,
    as scikit-learn's classifiers split off their validation samples: a split that happened to miss a
    small class would choose the epoch without it. Returns (train_images, train_labels, val_images,
    val_labels)."""
    total = len(images)
    if len(labels) != total:
        raise DataError(f"cannot split {total} images with {len(labels)} labels: pass matching arrays")
    if not isinstance(count, (int, np.integer)) or not 0 < count < total:
        raise DataError(f"--val {count} must be between 1 and {total - 1}: the training set has {total} samples; "
                        "pass a smaller one")
    _, sizes = np.unique(labels, return_counts=True)
    quotas = class_quotas(sizes, count, rng)
    by_class = np.lexsort((rng.random(total), labels))  # each class's samples together, in random order
    rank = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # a sample's place within its class
    held = np.zeros(total, bool)
    held[by_class[rank < np.repeat(quotas, sizes)]] = True
    # A mask keeps both parts in their original order, so epochs see a stable sequence for a seed.
    return (np.ascontiguousarray(images[~held]), np.ascontiguousarray(labels[~held]),
            np.ascontiguousarray(images[held]), np.ascontiguousarray(labels[held]))


def class_quotas(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """How many of each class's ``sizes`` samples to hold out so that they sum to ``count``: each share
    rounded down, then one more for the classes whose shares lost most to the rounding, equal losses
    in an order drawn by ``rng``. Integer arithmetic, so that no share is misjudged by a rounding error."""
    scaled = sizes.astype(np.int64) * count
    quotas, lost = np.divmod(scaled, sizes.sum())
    short = count - int(quotas.sum())
    quotas[np.lexsort((rng.permutation(len(sizes)), -lost))[:short]] += 1
    return quotas
