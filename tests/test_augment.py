"""Augmentation: what flip, translation and cutout do to a small image anyone can check by hand, in
every backend, and the random choices that Augmentation draws for them: their ranges, their
determinism for a seed, and that drawing allocates nothing; and the fixed views of test-time
augmentation (--tta), against shifted and mirrored images built here with NumPy alone."""

import tracemalloc

import numpy as np
import pytest

from fastnet import backends
from fastnet.data import Augmentation, View, tta_views
from helpers import assert_close

# One 3 x 4 image, one channel, pixels 1 .. 12 row by row:
#    1  2  3  4
#    5  6  7  8
#    9 10 11 12
IMAGE = np.arange(1, 13, dtype=np.uint8).reshape(1, 3, 4, 1)
IDENTITY = np.zeros(12, np.float32), np.ones(12, np.float32)  # shift, scale: out is the pixel value


def augmented(backend, flip=0, dy=0, dx=0, centre=(0, 0), cutout=0, images=IMAGE, shift_scale=IDENTITY):
    """The 3 x 4 result of augmenting the one image with these choices."""
    kernels = backends.get(backend)
    out = np.full((1, images[0].size), np.nan, shift_scale[0].dtype)
    kernels.augment_gather_normalize(images, np.array([0]), np.array([flip], np.uint8), np.array([[dy, dx]]),
                                     np.array([centre]), cutout, *shift_scale, out)
    return out.reshape(images.shape[1:3])


def test_no_augmentation_is_gather_normalize(backend):
    assert_close(augmented(backend), IMAGE[0, :, :, 0].astype(np.float32), rtol=0)


def test_flip_mirrors_left_to_right(backend):
    assert_close(augmented(backend, flip=1), [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9]], rtol=0, dtype=np.float32)


def test_translation_moves_the_content_and_pads_with_zero(backend):
    # dx = 1: one column right, a column of padding comes in on the left.
    assert_close(augmented(backend, dx=1), [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]], rtol=0, dtype=np.float32)
    # dy = -1: one row up, a row of padding at the bottom.
    assert_close(augmented(backend, dy=-1), [[5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 0]], rtol=0,
                 dtype=np.float32)
    # Further than the image: all padding.
    assert not augmented(backend, dy=3).any() and not augmented(backend, dx=-4).any()


def test_flip_comes_before_the_translation(backend):
    assert_close(augmented(backend, flip=1, dx=1, dy=1), [[0, 0, 0, 0], [0, 4, 3, 2], [0, 8, 7, 6]], rtol=0,
                 dtype=np.float32)


def test_cutout_blanks_a_square_around_its_centre_clipped_at_the_border(backend):
    # Size 2 around (1, 2): rows 0..1, columns 1..2.
    assert_close(augmented(backend, centre=(1, 2), cutout=2), [[1, 0, 0, 4], [5, 0, 0, 8], [9, 10, 11, 12]],
                 rtol=0, dtype=np.float32)
    # Size 3 around the corner (0, 0): rows and columns -1..1, of which 0..1 are in the image.
    assert_close(augmented(backend, centre=(0, 0), cutout=3), [[0, 0, 3, 4], [0, 0, 7, 8], [9, 10, 11, 12]],
                 rtol=0, dtype=np.float32)
    # Cutout is in output coordinates, after the translation.
    assert_close(augmented(backend, dx=1, centre=(2, 3), cutout=1), [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 0]],
                 rtol=0, dtype=np.float32)


def test_padding_is_the_mean_pixel(backend):
    """Padding and cutout write 0 after normalisation, which is what a pixel equal to the shift (the
    training mean) would give; the other pixels are normalised per feature."""
    shift = np.full(12, 6.5, np.float32)
    scale = np.linspace(0.5, 2, 12).astype(np.float32)
    result = augmented(backend, dx=1, shift_scale=(shift, scale))
    expected = (np.array([[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]], np.float32) - 6.5) * scale.reshape(3, 4)
    expected[:, 0] = 0
    assert_close(result, expected, rtol=1e-6)


def test_channels_move_together_and_float_images_work(backend):
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 4, 3), dtype=np.float32)
    out = np.empty((1, 36), np.float32)
    backends.get(backend).augment_gather_normalize(images, np.array([1]), np.array([1], np.uint8),
                                                   np.array([[0, -1]]), np.zeros((1, 2), np.int64), 0,
                                                   np.zeros(36, np.float32), np.ones(36, np.float32), out)
    expected = images[1, :, ::-1][:, 1:]  # flipped, then one column left
    assert_close(out.reshape(3, 4, 3)[:, :3], expected, rtol=0)
    assert not out.reshape(3, 4, 3)[:, 3].any()


# --- Test-time views -----------------------------------------------------------------------------------

def test_the_tta_views_of_each_tta():
    assert tta_views(None) == (View(),)
    assert tta_views("flip") == (View(), View(flip=True))
    # The image and its mirror image, each as it is and one pixel up, down, left and right.
    moves = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    assert tta_views("flip+shift") == tuple(View(flip, dy, dx) for flip in (False, True) for dy, dx in moves)


def shifted_by_hand(standardised, flip, dy, dx):
    """(N, H, W[, C]) standardised images mirrored (columns reversed), then moved dy rows down and dx
    columns right inside a border of zeros: a frame of zeros two pixels wide, and a window of it."""
    images = standardised[:, :, ::-1] if flip else standardised
    height, width = images.shape[1:3]
    framed = np.zeros((len(images), height + 4, width + 4, *images.shape[3:]), images.dtype)
    framed[:, 2:2 + height, 2:2 + width] = images
    return framed[:, 2 - dy:2 - dy + height, 2 - dx:2 - dx + width]


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4)], ids=["colour", "grey"])
@pytest.mark.parametrize("view", [View(), View(flip=True), View(dy=-1), View(dy=1), View(dx=-1), View(dx=1),
                                  View(True, -1, 0), View(True, 0, 1), View(dy=2, dx=-1)], ids=repr)
def test_a_view_gathers_the_mirrored_and_shifted_image_standardised(backend, shape, view):
    kernels = backends.get(backend)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
    shift = np.tile(np.float32([100, 120])[:shape[2] if len(shape) == 3 else 1], 12)
    scale = np.tile(np.float32([0.02, 0.03])[:shape[2] if len(shape) == 3 else 1], 12)
    indices = np.array([4, 0, 2])
    out = np.full((3, images[0].size), np.nan, np.float32)
    view.gather(kernels, shape)(images.reshape(5, -1), indices, shift, scale, out)
    standardised = (images[indices].astype(np.float64) - shift.reshape(shape)) * scale.reshape(shape)
    expected = shifted_by_hand(standardised, view.flip, view.dy, view.dx)
    assert_close(out.reshape(3, *shape), expected, rtol=1e-6, atol=1e-6, dtype=np.float32)
    if view.dy or view.dx:  # what came in from beyond the border is exactly the mean pixel
        assert (out == 0).sum() == (expected == 0).sum() > 0


# --- Drawing the per-sample choices -------------------------------------------------------------------

def test_draws_are_in_range_and_cover_it():
    augmentation = Augmentation((32, 30, 3), flip=True, translate=4, cutout=8)
    flips, offsets, centres = augmentation.draw(np.random.default_rng(0), 4000)
    assert flips.dtype == np.uint8 and set(np.unique(flips)) == {0, 1}
    assert 0.45 < flips.mean() < 0.55
    assert offsets.dtype == np.int64 and offsets.shape == (4000, 2)
    assert set(np.unique(offsets)) == set(range(-4, 5))
    assert set(np.unique(centres[:, 0])) == set(range(32)) and set(np.unique(centres[:, 1])) == set(range(30))


def test_draws_are_deterministic_for_a_seed():
    first, second = (Augmentation((8, 8, 3), flip=True, translate=2, cutout=3) for _ in range(2))
    a = [np.copy(x) for x in first.draw(np.random.default_rng(7), 64)]
    b = second.draw(np.random.default_rng(7), 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = second.draw(np.random.default_rng(8), 64)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_switched_off_choices_stay_zero_and_draw_nothing():
    augmentation = Augmentation((8, 8), flip=False, translate=0, cutout=0)
    # spec() is what warm_up rebuilds the run's augmentation from: all off, as constructed.
    assert augmentation.spec() == {"flip": False, "translate": 0, "cutout": 0}
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    flips, offsets, centres = augmentation.draw(rng, 16)
    assert rng.bit_generator.state == state
    assert not flips.any() and not offsets.any() and not centres.any()
    # Flip alone leaves the offsets at 0; the next batch size up reallocates, smaller ones reuse.
    only_flips = Augmentation((8, 8), flip=True)
    assert not only_flips.draw(rng, 16)[1].any()


def test_drawing_allocates_nothing_after_the_first_batch():
    augmentation = Augmentation((32, 32, 3), flip=True, translate=4, cutout=8)
    rng = np.random.default_rng(0)
    augmentation.draw(rng, 4096)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for size in (4096, 1000, 4096):
            augmentation.draw(rng, size)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # Any array of a batch of 4096 (the flips) is 4 KB or more; Python's small objects stay below.
    assert peak < 2048


def test_apply_augments_flat_images_into_the_batch(backend):
    """apply() draws and calls the kernel; flat (N, H*W*C) images are reshaped to their image shape."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 4 * 5 * 3), dtype=np.uint8)
    shift, scale = np.full(60, 100, np.float32), np.full(60, 0.01, np.float32)
    augmentation = Augmentation((4, 5, 3), flip=True, translate=1, cutout=2)
    out = np.empty((3, 60), np.float32)
    augmentation.apply(backends.get(backend), images, np.array([5, 0, 2]), np.random.default_rng(1), shift, scale,
                       out)
    flips, offsets, centres = Augmentation((4, 5, 3), flip=True, translate=1, cutout=2).draw(
        np.random.default_rng(1), 3)
    expected = np.empty((3, 60), np.float32)
    backends.get("numpy").augment_gather_normalize(images.reshape(6, 4, 5, 3), np.array([5, 0, 2]), flips, offsets,
                                                   centres, 2, shift, scale, expected)
    assert_close(out, expected, rtol=0)


def test_images_without_a_spatial_shape_are_refused():
    with pytest.raises(ValueError, match="shape"):
        Augmentation((3072,), flip=True)
    with pytest.raises(ValueError, match="0 or more"):
        Augmentation((4, 4, 3), translate=-1)
