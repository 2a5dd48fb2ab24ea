"""The validation split: the random training samples held out to choose the epoch by (fastnet train --val)."""

from __future__ import annotations

import numpy as np

from fastnet.errors import DataError


def split_validation(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``count`` random samples: returns (train_images, train_labels, val_images, val_labels)."""
    total = len(images)
    if len(labels) != total:
        raise DataError(f"cannot split {total} images with {len(labels)} labels: pass matching arrays")
    if not isinstance(count, (int, np.integer)) or not 0 < count < total:
        raise DataError(f"--val {count} must be between 1 and {total - 1}: the training set has {total} samples; "
                        "pass a smaller one")
    order = rng.permutation(total)
    # Sorting keeps both parts in their original order, so epochs see a stable sequence for a seed.
    val, train = np.sort(order[:count]), np.sort(order[count:])
    return (np.ascontiguousarray(images[train]), np.ascontiguousarray(labels[train]),
            np.ascontiguousarray(images[val]), np.ascontiguousarray(labels[val]))
