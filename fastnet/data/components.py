"""Principal components of the images (fastnet train --pca): fitting them, optionally so that a mirror flip
only changes their signs, and projecting images onto them."""

from __future__ import annotations

import math

import numpy as np

from fastnet import settings

PCA_SAMPLE = 5_000  # training images the principal components of --pca are estimated from
PROJECT_CHUNK = 1024
# --whiten: the least variance a component is scaled as if it had, as a fraction of a standardised
# pixel's mean variance. With 256 components of CIFAR-10 (the fast recipe, 30 epochs), a floor of 1
# reached 62.46 %, of 0.1 62.37 %; 0.01 overfitted most (81.6 % on the training images after 40 epochs).
WHITEN_FLOOR = 1.0


def principal_components(images: np.ndarray, shift: np.ndarray, scale: np.ndarray, count: int,
                         rng: np.random.Generator, kernels, sample: int | None = None,
                         mirrored: tuple[int, ...] | None = None, whiten: bool = False) -> np.ndarray:
    """The ``count`` directions in which the standardised images, ``(images - shift) * scale``, vary
    most: an (input_size, count) matrix of orthonormal columns in decreasing order of variance, in
    the dtype of ``shift``.

    They are estimated from ``sample`` images (default PCA_SAMPLE) that ``rng`` draws. For CIFAR-10,
    5,000 images trained networks as accurate as 10,000 or 20,000 did, in less time and memory.

    With ``mirrored``, the shape of one image ((H, W, C) or (H, W)), they are the components of the
    images together with their mirror images. Each is then mirror-symmetric or antisymmetric (see
    mirror_signs), so that flipping an image only changes the sign of some of its components.

    With ``whiten``, each column is divided by the standard deviation along it, so that every component
    of the projected images has unit variance (PCA whitening, which Lin, Memisevic and Konda 2015 train
    on); the columns stay orthogonal but are no longer of unit length. WHITEN_FLOOR times a standardised
    pixel's mean variance is added to each component's variance before the square root, so that the
    faintest ones, mostly noise, are not blown up without limit.
    """
    flat = images.reshape(len(images), -1)
    size = flat.shape[1]
    rows = np.sort(rng.choice(len(flat), size=min(sample or PCA_SAMPLE, len(flat)), replace=False))
    settings.positive_integer("pca", count, 256)
    settings.components_for("pca", count, size, len(rows), sampled_from=len(flat) if len(rows) < len(flat) else None)
    standardised = np.empty((len(rows), size), shift.dtype)
    kernels.gather_normalize(flat, rows, shift, scale, standardised)
    mean = standardised.mean(axis=0)
    mirror = None if mirrored is None else mirror_permutation(mirrored)
    standardised -= mean if mirror is None else (mean + mean[mirror]) / 2
    if mirror is None:
        covariance = np.dot(standardised.T, standardised) / len(rows)
        variance = np.trace(covariance)
        values, vectors = _top_eigenpairs(covariance, count)
    else:
        # With the mirror images, the covariance is (C + M C M) / 2 for the flip M; its eigenvectors
        # are symmetric or antisymmetric. Solving in each of those two subspaces on its own keeps them
        # exactly so, where one solve would mix two of nearly equal variance. In a subspace it is the
        # covariance of the images' coordinates there, which sums and differences of mirrored pixels
        # give: half the multiplications of C, and no products with the bases.
        values, vectors, variance = [], [], 0.0
        for basis, coordinates in zip(_mirror_bases(mirror, standardised.dtype),
                                      _mirror_coordinates(standardised, mirror), strict=True):
            if basis.shape[1]:
                covariance = np.dot(coordinates.T, coordinates) / len(rows)
                variance += np.trace(covariance)
                found = _top_eigenpairs(covariance, min(count, basis.shape[1]))
                values.append(found[0])
                vectors.append(basis @ found[1])
        order = np.argsort(-np.concatenate(values), kind="stable")[:count]
        values, vectors = np.concatenate(values)[order], np.hstack(vectors)[:, order]
    del standardised
    # LAPACK may return either sign of an eigenvector; fixing one keeps runs independent of that.
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(count)])
    if whiten:
        vectors /= np.sqrt(np.maximum(values, 0) + WHITEN_FLOOR * variance / size)
    return np.ascontiguousarray(vectors, dtype=shift.dtype)


def _top_eigenpairs(symmetric: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues of a symmetric matrix, largest first, and their eigenvectors.
    Only those are computed: for 512 of 3072, three times faster than all of them."""
    import scipy.linalg  # here, as every fastnet command would otherwise wait 0.2 s for it to load

    size = len(symmetric)
    values, vectors = scipy.linalg.eigh(symmetric, subset_by_index=(size - count, size - 1))
    return values[::-1], vectors[:, ::-1]


def mirror_permutation(image_shape: tuple[int, ...]) -> np.ndarray:
    """mirror[i]: the feature of a flattened (H, W, C) or (H, W) image that a left-right flip moves to
    feature i. A flip swaps the two, so mirror is its own inverse."""
    features = np.arange(math.prod(image_shape)).reshape(image_shape[0], image_shape[1], -1)
    return features[:, ::-1].reshape(-1)


def mirror_images(images: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """A new (N, features) array of ``images`` (N rows of flattened (H, W, C) or (H, W) images) flipped
    left to right, C-contiguous as the kernels read it (indexing the columns with an array would lay
    it out column by column, and each kernel call would copy all of it)."""
    return np.take(images.reshape(len(images), -1), mirror_permutation(image_shape), axis=1)


def _mirror_bases(mirror: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases, as columns, of the mirror-symmetric and of the antisymmetric images: a
    pair of features that the flip swaps contributes (e_i + e_j) / sqrt 2 to the first and
    (e_i - e_j) / sqrt 2 to the second; a feature it keeps (the middle column of an odd width), e_i
    to the first."""
    index = np.arange(len(mirror))
    firsts, kept = index[index < mirror], index[index == mirror]
    pairs = np.arange(len(firsts))
    half = np.sqrt(0.5)
    symmetric = np.zeros((len(mirror), len(firsts) + len(kept)), dtype)
    symmetric[firsts, pairs] = symmetric[mirror[firsts], pairs] = half
    symmetric[kept, len(firsts) + np.arange(len(kept))] = 1
    antisymmetric = np.zeros((len(mirror), len(firsts)), dtype)
    antisymmetric[firsts, pairs] = half
    antisymmetric[mirror[firsts], pairs] = -half
    return symmetric, antisymmetric


def _mirror_coordinates(images: np.ndarray, mirror: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates of (N, features) ``images`` in the two bases of _mirror_bases, in their column
    order: (x_i + x_j) / sqrt 2 for each swapped pair and x_i for each kept feature, then (x_i - x_j) / sqrt 2."""
    index = np.arange(len(mirror))
    firsts, kept = index[index < mirror], index[index == mirror]
    half = images.dtype.type(np.sqrt(0.5))
    left, right = images[:, firsts], images[:, mirror[firsts]]
    return np.hstack([(left + right) * half, images[:, kept]]), (left - right) * half


def mirror_signs(components: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """+1 for each column of ``components`` that a left-right flip of the image leaves as it is, -1 for
    each that it negates (whitened or not), in the components' dtype. Only components fitted with ``mirrored`` are
    all one or the other; anything else is a ValueError."""
    alignment = np.einsum("ij,ij->j", components, components[mirror_permutation(image_shape)], dtype=np.float64)
    alignment /= np.einsum("ij,ij->j", components, components, dtype=np.float64)  # whitened: not of unit length
    if np.any(np.abs(np.abs(alignment) - 1) > 1e-3):
        raise ValueError("these components are not mirror-symmetric or antisymmetric: fit them with mirrored=")
    return np.sign(alignment).astype(components.dtype)


def project(images: np.ndarray, shift: np.ndarray, scale: np.ndarray, projection: np.ndarray, kernels,
            chunk: int = PROJECT_CHUNK, gather=None) -> np.ndarray:
    """``((images - shift) * scale) @ projection`` as an (N, projection.shape[1]) array, computed with
    the backend's kernels one chunk at a time, so that the standardised pixels never exist all at once.
    ``gather`` standardises the rows instead of kernels.gather_normalize, with its arguments: a
    View.gather, to project that view of the images."""
    gather = gather or kernels.gather_normalize
    flat = images.reshape(len(images), -1)
    out = np.empty((len(flat), projection.shape[1]), projection.dtype)
    standardised = np.empty((min(chunk, len(flat)), flat.shape[1]), projection.dtype)
    no_bias = np.zeros(projection.shape[1], projection.dtype)
    for start in range(0, len(flat), chunk):
        stop = min(start + chunk, len(flat))
        rows = standardised[:stop - start]
        gather(flat, np.arange(start, stop), shift, scale, rows)
        kernels.dense_forward(rows, projection, no_bias, out[start:stop])
    return out
