"""Using a trained model on images: `fastnet.load(...)` in Python and `fastnet predict` on files.

Whatever the input, a picture goes through the same preprocessing as in training and in
`fastnet evaluate`: the checkpoint's channel statistics, turned into a per-feature shift and scale
by `fastnet.evaluation.normalizer` and applied by the backend's own `gather_normalize` kernel; a model
trained on principal components (--pca) projects onto them with `dense_forward` and runs the network
as it was trained. A uint8 image therefore gets the same logits here as it does in `fastnet evaluate`,
with the same test-time augmentation (--tta) unless told otherwise.
"""

import contextlib
import csv
import math
import os
import tempfile

import numpy as np

from fastnet import checkpoint, data, settings, storage
from fastnet.errors import FastnetError
from fastnet.evaluation import EVAL_BATCH, normalizer, saved_tta, views_for
from fastnet.images import IMAGE_SUFFIXES, ImageError, decode, describe, resize, shown, unfollowed, walk

# The Pillow mode that gives a picture the channel count a model was trained on.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def softmax(logits):
    """Row-wise probabilities, as float32. Subtracting each row's maximum keeps exp() from
    overflowing, and float64 keeps tiny probabilities from rounding to a sum that is not 1."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probabilities, k):
    """(indices, probabilities) of the k most likely classes of each row, most likely first; ties go
    to the lower class index, so the order never depends on the sort's whims."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


def percent(probability):
    """A probability for people: one decimal, without claiming a certainty of 0 % or 100 % that
    rounding made up."""
    if 0 < probability < 0.0005:
        return "<0.1%"
    if 0.9995 <= probability < 1:
        return ">99.9%"
    return f"{probability:.1%}"


def image_geometry(sample_shape):
    """(Pillow mode, (width, height), shape of one sample) for a model's sample shape, or None when
    the model was not trained on something an image file can be turned into.

    A flat sample (D,) has lost its geometry; the only unambiguous readings are a square grey
    image (D = s*s) or a square colour one (D = 3*s*s), and no D is both.
    """
    if len(sample_shape) == 3 and sample_shape[2] in _MODES:
        height, width, channels = sample_shape
        return _MODES[channels], (width, height), tuple(sample_shape)
    if len(sample_shape) == 2:
        height, width = sample_shape
        return "L", (width, height), tuple(sample_shape)
    if len(sample_shape) == 1:
        size = sample_shape[0]
        for channels, mode in ((1, "L"), (3, "RGB")):
            side = math.isqrt(size // channels)
            if side * side * channels == size:
                return mode, (side, side), tuple(sample_shape)
    return None


class Model:
    """A trained network with the preprocessing it was trained with.

    `images` may be one image in the model's input shape or a batch of them ((N, H, W, C), or
    (N, H, W) / (N, D) for models trained on such data); flattened rows (N, D) are accepted too.
    Pixels are uint8 0-255 or floats in [0, 1], as in training.

    `tta` is a test-time augmentation of fastnet.evaluation.TTA ("flip": the mean of the logits of each image
    and of its mirror image; "flip+shift": of those two each as it is and moved a pixel each way), or "run"
    for the one the model's run was evaluated with.
    """

    def __init__(self, saved, tta="run"):
        self.net = saved.net  # on raw inputs, with a --pca projection folded in
        self._trained_net, self._projection = saved.trained_net, saved.projection
        self.tta = settings.test_time_augmentation("tta", saved_tta(saved.config, tta))
        self._views = views_for(self.tta, saved.sample_shape, "this model takes samples of shape")
        self.mean, self.std = saved.mean, saved.std
        self.sample_shape = tuple(saved.sample_shape)
        self.class_names = list(saved.class_names)
        self.config = saved.config
        self.input_size = self.net.sizes[0]

    @property
    def num_classes(self):
        return self.net.sizes[-1]

    def __repr__(self):
        sizes = "-".join(map(str, self.net.sizes))
        return f"<fastnet.Model {sizes} MLP, {self.net.backend} backend, inputs {self.sample_shape}>"

    def logits(self, images):
        """Raw scores (N, classes) in the network's dtype."""
        rows = self._as_rows(images)
        logits = self._logits(rows, self._views[0])
        for view in self._views[1:]:  # summed in evaluation's order, so that the numbers are its own
            logits += self._logits(rows, view)
        if len(self._views) > 1:
            logits /= len(self._views)
        return logits

    def _logits(self, rows, view):
        """The logits of `view` (fastnet.data.View) of each row."""
        gather = view.gather(self.net.kernels, self.sample_shape)
        shift, scale = normalizer(self.mean, self.std, self.input_size, rows.dtype, self.net.dtype)
        logits = np.empty((len(rows), self.num_classes), self.net.dtype)
        # In slices, so that the float copy of a large batch never has to exist all at once.
        for start in range(0, len(rows), EVAL_BATCH):
            stop = min(start + EVAL_BATCH, len(rows))
            if self._projection is None:
                inputs = np.empty((stop - start, self.input_size), self.net.dtype)
                gather(rows, np.arange(start, stop), shift, scale, inputs)
            else:
                inputs = data.project(rows[start:stop], shift, scale, self._projection, self.net.kernels,
                                      gather=gather)
            logits[start:stop] = self._trained_net.forward(inputs)
        return logits

    def predict_proba(self, images):
        """Class probabilities (N, classes), float32, each row summing to 1."""
        return softmax(self.logits(images))

    def predict(self, images):
        """The most likely class index of each image, (N,) int64."""
        return self.logits(images).argmax(axis=1).astype(np.int64)

    def _as_rows(self, images):
        images = np.asarray(images)
        if images.shape in (self.sample_shape, (self.input_size,)):
            images = images[None]
        if images.ndim < 2 or images.shape[1:] not in (self.sample_shape, (self.input_size,)):
            batch = ", ".join(map(str, ("N", *self.sample_shape)))
            raise ValueError(f"images of shape {images.shape} do not fit this model: it takes one image of "
                             f"shape {self.sample_shape} or a batch ({batch})")
        if images.dtype == np.uint8:
            pass
        elif np.issubdtype(images.dtype, np.integer):
            if images.size and (images.min() < 0 or images.max() > 255):
                raise ValueError(f"integer pixels range over [{images.min()}, {images.max()}], not 0-255: "
                                 "pass uint8 0-255 or floats in [0, 1]")
            images = images.astype(np.uint8)
        elif np.issubdtype(images.dtype, np.floating):
            # float32, because that is what training turns float images into.
            images = images.astype(np.float32, copy=False)
            if images.size and not np.isfinite(images).all():
                raise ValueError("images contain NaN or infinite values")
            if images.size and (images.min() < 0.0 or images.max() > 1.0):
                raise ValueError(f"float pixels range over [{images.min():g}, {images.max():g}], not [0, 1]: "
                                 "divide by 255 or pass uint8")
        else:
            raise ValueError(f"images are {images.dtype}: pass uint8 0-255 or floats in [0, 1]")
        return np.ascontiguousarray(images.reshape(len(images), self.input_size))


def load(path, backend=None, tta="run"):
    """The model saved at `path` (a model.npz written by `fastnet train`), ready to predict.

    `backend` picks the kernels as everywhere else (default: $FASTNET_BACKEND or numpy); `tta` is
    Model's.
    """
    return Model(checkpoint.load(os.fspath(path), backend=backend), tta)


# --- Image files ------------------------------------------------------------------------------------

def image_files(paths):
    """(files, warnings): the files to classify, and one warning line per thing left out.

    Each path is kept as given; each folder is replaced by the image files anywhere under it (by
    name, as the training loader picks them: an image suffix in any case, not a dot file), in the
    order of their paths relative to the folder, sorted. Other files are skipped and counted in one
    warning. Symbolic links to folders are followed, except one that would loop or read a folder a
    second time (its target is inside a folder already walked, or holds one): it is named in one
    warning instead, so that every image is classified once. A path that does not exist is kept, so
    that it gets its own error line like any other unreadable file."""
    found, empty, warnings = [], [], []
    for path in map(os.fspath, paths):
        if not os.path.isdir(path):
            found.append(path)
            continue
        files, skipped, loops = walk(path)
        found.extend(os.path.join(path, relative) for relative in files)
        if not files:
            empty.append(path)
        if skipped:
            noun, verb = ("file", "is not an image") if len(skipped) == 1 else ("files", "are not images")
            warnings.append(f"skipped {len(skipped)} {noun} in {path} that {verb} by name: {shown(skipped)}")
        if loops:
            warnings.append(unfollowed(path, loops, "classified"))
    if not found:
        where = ", ".join(empty) or "what was given"
        raise FastnetError(f"no image files in {where} or its subfolders: pass image files, or folders that hold "
                           f"{', '.join(IMAGE_SUFFIXES)} files")
    return found, warnings


def read_image(path, sample_shape):
    """The image file at `path` as a uint8 array of `sample_shape`: read by fastnet.images.decode
    (EXIF orientation, the model's channels) and resized (stretched, not cropped) to its input size."""
    geometry = image_geometry(sample_shape)
    if geometry is None:
        raise FastnetError(f"the model takes samples of shape {tuple(sample_shape)}, which no image file "
                           "maps onto: call fastnet.load(model).predict on arrays instead")
    mode, size, shape = geometry
    pixels = decode(path, mode)
    if pixels.shape[1::-1] != size:
        try:
            pixels = resize(pixels, size[1], size[0])
        except Exception as exc:  # Pillow's resize raises several types, each meaning "cannot be used"
            raise ImageError(f"{path}: {describe(exc)}; pass a PNG, JPEG or BMP image") from exc
    return pixels.reshape(shape)


def predict_files(model, paths, top=3):
    """Classify each file: yields (path, result, error) with exactly one of result / error set.
    result is a list of (class index, class name, probability), most likely first; error is an
    ImageError whose message starts with the path."""
    for path in paths:
        try:
            pixels = read_image(path, model.sample_shape)
        except ImageError as exc:
            yield path, None, exc
            continue
        indices, probabilities = top_k(model.predict_proba(pixels), top)
        yield path, [(int(i), model.class_names[i], float(p))
                     for i, p in zip(indices[0], probabilities[0], strict=True)], None


class CsvWriter:
    """`--csv FILE`: one row per image, path,class,probability then class_2,probability_2,... up to
    `top`, and an error column for a file that could not be read. Written under a temporary name in
    FILE's folder and renamed to FILE by close(), so that FILE is never half written; abort()
    removes the temporary file."""

    def __init__(self, path, top, num_classes):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            handle, self._temporary = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                                                       dir=folder)
        except OSError as exc:
            raise self._cannot_write(exc) from exc
        self._file = os.fdopen(handle, "w", newline="", encoding="utf-8")
        self.top = min(top, num_classes)
        columns = ["path", "class", "probability"]
        for k in range(2, self.top + 1):
            columns += [f"class_{k}", f"probability_{k}"]
        self._writer = csv.DictWriter(self._file, [*columns, "error"])
        self._put({name: name for name in self._writer.fieldnames})  # the header

    def write(self, path, result, error):
        row = {"path": path}
        if error is not None:
            row["error"] = str(error)
        for k, (_, name, probability) in enumerate(result or (), start=1):
            suffix = "" if k == 1 else f"_{k}"
            row[f"class{suffix}"], row[f"probability{suffix}"] = name, repr(probability)
        self._put(row)

    def _put(self, row):
        try:
            self._writer.writerow(row)
        except OSError as exc:
            self.abort()
            raise self._cannot_write(exc) from exc

    def close(self):
        try:
            self._file.close()
            os.replace(self._temporary, self.path)
        except OSError as exc:
            self.abort()
            raise self._cannot_write(exc) from exc

    def abort(self):
        with contextlib.suppress(OSError):  # what is still buffered cannot be written: it is dropped
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)

    def _cannot_write(self, exc):
        return storage.refused(self.path, exc) or FastnetError(
            f"cannot write --csv {self.path} ({exc.strerror}): pass a path in a folder you can write to")
