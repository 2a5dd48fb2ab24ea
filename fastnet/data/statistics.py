"""Per-channel (or per-feature) mean and standard deviation of a training set: what the trainer standardises inputs
with."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from fastnet.errors import DataError

# Images per step of channel_stats: big enough to be fast, small enough that the float64 copies of a
# chunk (512 CIFAR images: 12.6 MB each) stay small beside the uint8 data set. Tests shrink it.
STATS_CHUNK = 512
# uint8 data of at most this many channels (a pixel's: grey, RGB, RGBA) is counted value by value
# (_uint8_moments); wider uint8 rows, such as a table's, take the float64 sums, whose rows reduce fast.
COUNTED_CHANNELS = 4


def channel_stats(images: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of ``images`` scaled to [0, 1], as float32.

    Works chunk by chunk in float64, merging partial results (Chan et al.), so the memory needed stays
    that of one chunk and the variance does not suffer the cancellation of sum-of-squares formulas.
    """
    images = np.asanyarray(images)  # keeps np.memmap lazy: only one chunk is ever read into memory
    if images.ndim < 2 or len(images) == 0:
        raise DataError(f"cannot compute channel statistics of images with shape {images.shape}: need N >= 1 samples")
    channels = images.shape[-1] if images.ndim == 4 else 1
    mean, variance = _moments(images, channels, chunk)
    # A constant channel would otherwise divide by ~0 when normalising and blow up the inputs.
    std = np.maximum(np.sqrt(variance), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def feature_stats(samples: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population std of rows ``samples`` (N, D), as channel_stats computes them
    with every feature a channel (uint8 scaled to [0, 1] alike), for data whose features are not
    pixels: the columns of a table have scales of their own, so each is standardised by its own.

    Where channel_stats floors a std at 1e-3, a pixel's smallest meaningful spread, here a feature
    counts as constant only when its std is below 1e-10 of its mean's magnitude, what the float64
    sums leave of a spread of zero; it then gets a std of one unit of the data, so that it is
    centred and not blown up. Any larger spread is a feature's own, however small its scale.
    """
    samples = np.asanyarray(samples)
    if samples.ndim != 2 or len(samples) == 0:
        raise DataError(f"cannot compute feature statistics of samples with shape {samples.shape}: need (N, D), "
                        f"N >= 1")
    mean, variance = _moments(samples, samples.shape[1], chunk)
    std = np.sqrt(variance)
    unit = 1.0 / 255.0 if samples.dtype == np.uint8 else 1.0
    std = np.where(std <= 1e-10 * np.abs(mean), unit, std)
    return mean.astype(np.float32), std.astype(np.float32)


def _moments(images, channels, chunk=None):
    """(mean, population variance) in float64 of each of the `channels` innermost values of `images`."""
    chunk = chunk or STATS_CHUNK
    if images.dtype == np.uint8 and 0 < channels <= COUNTED_CHANNELS:
        return _uint8_moments(images, channels, chunk)
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, channels).astype(np.float64) * scale
        block_mean = block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta, total = block_mean - mean, count + len(block)
        mean = mean + delta * (len(block) / total)
        m2 = m2 + block_m2 + delta ** 2 * (count * len(block) / total)
        count = total
    return mean, m2 / count


def _uint8_moments(images, channels, chunk):
    """_moments of uint8 values scaled to [0, 1], exactly: how often each of the 256 values occurs in
    each channel gives the sums of the values and of their squares as integers, and the mean and the
    variance as fractions, each rounded to float64 once. A count reads each byte once, where the
    float64 path converts and subtracts: several times faster, with the same float32 statistics
    (benchmarks/RESULTS.md, "Channel statistics counted")."""
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk]).reshape(-1, channels)
        for channel in range(channels):
            counts[channel] += np.bincount(block[:, channel], minlength=256)
    values, n = np.arange(256, dtype=np.int64), int(counts[0].sum())
    mean, variance = np.zeros(channels), np.zeros(channels)
    for channel, count in enumerate(counts):
        total, squares = int(count @ values), int(count @ values ** 2)  # below 2**63 for 10**10 values
        mean[channel] = Fraction(total, 255 * n)
        variance[channel] = Fraction(n * squares - total * total, (255 * n) ** 2)
    return mean, variance
