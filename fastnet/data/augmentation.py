"""The random augmentations of each training batch: of pixels (Augmentation), of principal components
(ComponentFlip), and of pixels projected onto components afterwards (ProjectedAugmentation); and the
fixed ones that test-time augmentation averages over (View, tta_views)."""

from __future__ import annotations

import dataclasses

import numpy as np

from fastnet import settings


class Augmentation:
    """The random choices of one training batch for the augment_gather_normalize kernel, drawn from the
    run's generator into arrays allocated once, so drawing allocates nothing per step.

    flip: mirror each image left to right with probability 1/2.
    translate: move each image by whole pixels, dy and dx each uniform in [-translate, translate]; what
        comes in from beyond the border is padding, the mean pixel (0 after normalisation).
    cutout: blank a cutout x cutout square (to the mean pixel) around a centre uniform over the image,
        clipped at the border (DeVries and Taylor, 2017); 0 switches it off.

    image_shape is one sample's (H, W, C), or (H, W) for one channel. draw() takes, in this order and
    only for what is switched on, one rng.random call for the flips, one for the offsets, one for the
    cutout centres, so a seed gives the same batches every run.
    """

    def __init__(self, image_shape, flip=False, translate=0, cutout=0):
        self.image_shape = channel_last(image_shape)
        self.flip = bool(flip)
        self.translate, self.cutout = settings.pixels("translate", translate), settings.pixels("cutout", cutout)
        self._capacity = 0

    def spec(self) -> dict:
        """The settings as a JSON-serialisable dict: Augmentation(shape, **spec()) rebuilds it."""
        return {"flip": self.flip, "translate": self.translate, "cutout": self.cutout}

    def _reserve(self, batch_size):
        if batch_size > self._capacity:
            self._capacity = batch_size
            self._uniform = np.empty((batch_size, 2), np.float64)
            self._uniform_flips = np.empty(batch_size, np.float64)
            self._flips = np.zeros(batch_size, np.uint8)
            self._offsets = np.zeros((batch_size, 2), np.int64)
            self._centres = np.zeros((batch_size, 2), np.int64)

    def draw(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flips (B,) uint8, offsets (B, 2) int64, cutout_centres (B, 2) int64) for a batch of
        batch_size, views of arrays that the next draw overwrites. What is switched off stays 0."""
        self._reserve(batch_size)
        flips, offsets, centres = self._flips[:batch_size], self._offsets[:batch_size], self._centres[:batch_size]
        if self.flip:
            uniform = self._uniform_flips[:batch_size]
            rng.random(out=uniform)
            np.less(uniform, 0.5, out=flips.view(np.bool_))  # a bool view: no cast, so no temporary
        if self.translate:
            uniform = self._uniform[:batch_size]
            rng.random(out=uniform)
            self._to_integers(uniform, (2 * self.translate + 1,) * 2, offsets)
            offsets -= self.translate
        if self.cutout:
            uniform = self._uniform[:batch_size]
            rng.random(out=uniform)
            self._to_integers(uniform, self.image_shape[:2], centres)
        return flips, offsets, centres

    @staticmethod
    def _to_integers(uniform, counts, out):
        """floor(uniform * count) into the integer array out, column by column with one count each:
        uniform in [0, 1) over 0 .. count - 1. (Generator.integers cannot write into an existing array.)
        In float64, u * count < count for every u < 1, so no draw lands on count."""
        for column, count in enumerate(counts):
            # One column at a time with a scalar: broadcasting an array of counts made NumPy copy.
            np.multiply(uniform[:, column], count, out=uniform[:, column])
        np.floor(uniform, out=uniform)
        np.copyto(out, uniform, casting="unsafe")

    def apply(self, kernels, images, indices, rng, shift, scale, out, out16=None):
        """Draw this batch's choices and gather, augment and normalise images[indices] into out (and
        its bfloat16 rounding into out16, when given), with `kernels` a backend (net.kernels).
        images: (N, H, W, C), or anything of N * H * W * C values in that order (it is reshaped, a
        view for a contiguous array)."""
        flips, offsets, centres = self.draw(rng, len(indices))
        images = images.reshape(len(images), *self.image_shape)
        kernels.augment_gather_normalize(images, indices, flips, offsets, centres, self.cutout, shift, scale,
                                         out, out16)


def channel_last(image_shape):
    """(H, W, C) of images of shape (H, W, C), or (H, W) for one channel: the shape the augmentation
    kernel reads them in."""
    if len(image_shape) not in (2, 3):
        raise ValueError(f"augmentation needs images of shape (H, W, C) or (H, W), got samples of shape "
                         f"{tuple(image_shape)}")
    return tuple(int(s) for s in image_shape) + ((1,) if len(image_shape) == 2 else ())


@dataclasses.dataclass(frozen=True)
class View:
    """One fixed augmentation of every image, for test-time averaging (--tta): mirrored left to right
    or not, then moved dy rows down and dx columns right (negative: up, left), with padding (the
    mean pixel) coming in from beyond the border. These are Augmentation's flip and translation with
    the same choice for every image, made by the same kernel, so a view is an image the network may
    have met in training."""

    flip: bool = False
    dy: int = 0
    dx: int = 0

    def gather(self, kernels, image_shape):
        """A function gather(images, indices, shift, scale, out) with gather_normalize's arguments that
        writes this view of the flattened images[indices] of `image_shape`, normalised, into out."""
        if self == View():
            return kernels.gather_normalize  # the image as it is: no per-pixel index arithmetic
        shape = channel_last(image_shape)

        def gather(images, indices, shift, scale, out):
            count = len(indices)
            flips = np.full(count, self.flip, np.uint8)
            offsets = np.tile(np.array([self.dy, self.dx], np.int64), (count, 1))
            kernels.augment_gather_normalize(images.reshape(len(images), *shape), indices, flips, offsets,
                                             np.zeros((count, 2), np.int64), 0, shift, scale, out)
        return gather


# --tta flip+shift: each image and its mirror image, as they are and moved one pixel up, down, left
# and right, the smallest moves that a network trained with --translate has learnt to classify alike.
TEST_TIME_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def tta_views(tta):
    """The views of each image whose logits test-time augmentation `tta` (settings.TEST_TIME_AUGMENTATIONS)
    averages, the image as it is first."""
    flips = (False, True) if tta in ("flip", "flip+shift") else (False,)
    shifts = TEST_TIME_SHIFTS if tta == "flip+shift" else ((0, 0),)
    return tuple(View(flip, dy, dx) for flip in flips for dy, dx in shifts)


class ComponentFlip:
    """Random left-right flips of images stored as components that are each mirror-symmetric or
    antisymmetric (fastnet train --pca K --flip): flipping an image negates its antisymmetric
    components, one multiply each, where flipping pixels would need a new projection. ``signs`` is
    what mirror_signs returns. The flips are drawn as Augmentation(flip=True) draws them."""

    def __init__(self, signs: np.ndarray):
        self.signs = signs
        self._draws = Augmentation((1, 1), flip=True)

    def apply(self, kernels, inputs, indices, rng, shift, scale, out, out16=None):
        """Draw this batch's flips and gather inputs[indices] into out, flipped where drawn. shift and
        scale are not used: the components are standardised already."""
        flips, _, _ = self._draws.draw(rng, len(indices))
        kernels.gather_flip_components(inputs, indices, flips, self.signs, out, out16)


class ProjectedAugmentation:
    """Pixel augmentations for a run on principal components (fastnet train --pca K with --translate
    or --cutout): each batch is augmented as pixels, as ``augmentation`` does, then projected onto the
    components, which costs one (B, input_size) x (input_size, K) GEMM per step. The pixel batch is
    kept in a buffer per batch size, allocated once."""

    def __init__(self, augmentation: Augmentation, projection: np.ndarray):
        self.augmentation, self.projection = augmentation, projection
        self._no_bias = np.zeros(projection.shape[1], projection.dtype)
        self._pixels = {}

    def apply(self, kernels, images, indices, rng, shift, scale, out, out16=None):
        """Draw this batch's augmentations, gather, augment and standardise images[indices] as pixels,
        and write their projection into out (in float32, whatever the training precision)."""
        pixels = self._pixels.get(len(indices))
        if pixels is None:
            pixels = self._pixels[len(indices)] = np.empty((len(indices), len(self.projection)), out.dtype)
        self.augmentation.apply(kernels, images, indices, rng, shift, scale, pixels)
        kernels.dense_forward(pixels, self.projection, self._no_bias, out, out16)
