"""The Numba backend's losses, softmax cross-entropy with and without label smoothing, and
count_correct: what is read from the logits, one row at a time on one thread."""

import numpy as np
from numba import njit

from fastnet.backends.numba_contiguous import on_contiguous


@njit(cache=True, nogil=True, error_model="numpy")
def _row_max(logits, i):
    """The largest logit of row i, which the losses subtract before exponentiating so none overflows."""
    top = logits[i, 0]
    for j in range(1, logits.shape[1]):
        top = max(top, logits[i, j])
    return top


@on_contiguous("dlogits")
@njit(cache=True, nogil=True, error_model="numpy")
def softmax_cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy and its gradient, one row at a time: the row's maximum, then its
    exponentials and their sum, then the normalised gradient. The mean loss is summed in float64,
    a scalar that never touches an array."""
    batch, classes = logits.shape
    real = dlogits.dtype.type
    total = 0.0
    for i in range(batch):
        top = _row_max(logits, i)
        row_sum = real(0)
        for j in range(classes):
            e = np.exp(logits[i, j] - top)
            dlogits[i, j] = e
            row_sum += e
        total += np.log(row_sum) - (logits[i, labels[i]] - top)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / row_sum
        dlogits[i, labels[i]] -= real(1)
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / real(batch)
    return total / batch


@on_contiguous("dlogits")
@njit(cache=True, nogil=True, error_model="numpy")
def softmax_cross_entropy_smoothed(logits, labels, smoothing, dlogits):
    """softmax_cross_entropy against label-smoothed targets, one row at a time as there; the row's
    mean logit joins the loss, and smoothing / K comes off every gradient element."""
    batch, classes = logits.shape
    real = dlogits.dtype.type
    spread, keep = real(smoothing / classes), real(1 - smoothing)
    smoothing_real = real(smoothing)
    total = 0.0
    for i in range(batch):
        top = _row_max(logits, i)
        row_sum = real(0)
        shifted_sum = 0.0
        for j in range(classes):
            shifted = logits[i, j] - top
            shifted_sum += shifted
            e = np.exp(shifted)
            dlogits[i, j] = e
            row_sum += e
        mean_shifted = real(shifted_sum / classes)
        total += np.log(row_sum) - keep * (logits[i, labels[i]] - top) - smoothing_real * mean_shifted
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / row_sum - spread
        dlogits[i, labels[i]] -= keep
        for j in range(classes):
            dlogits[i, j] = dlogits[i, j] / real(batch)
    return total / batch


@on_contiguous()
@njit(cache=True, nogil=True, error_model="numpy")
def count_correct(logits, labels):
    """Rows whose first largest logit is at the label, as np.argmax breaks ties."""
    correct = 0
    for i in range(logits.shape[0]):
        best = 0
        for j in range(1, logits.shape[1]):
            if logits[i, j] > logits[i, best]:
                best = j
        correct += best == labels[i]
    return correct
