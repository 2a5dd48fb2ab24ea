"""Finding, loading, checking and downloading CIFAR-10 (or any small image set in the same layouts).

Three layouts are understood, so people can use whatever they already have on disk: the official
``cifar-10-python.tar.gz`` (read in place, never unpacked), its unpacked ``cifar-10-batches-py/``
folder, and a folder of four ``.npy`` files. Whatever the layout, the result is a :class:`Dataset`
checked by one function, so the trainer never sees a malformed array and every problem reaches the
user as a one-line :class:`DataError` instead of a traceback.

What the trainer does to the images before they reach the network lives here too: channel
statistics, the validation split, principal components (``fastnet train --pca``) and the random
augmentations of each batch.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import lzma
import math
import os
import pathlib
import pickle
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from tqdm import tqdm

from fastnet.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"

BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
NPY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
# Images per step of channel_stats: big enough to be fast, small enough that the float64 copies of a
# chunk (512 CIFAR images: 12.6 MB each) stay small beside the uint8 data set. Tests shrink it.
STATS_CHUNK = 512
PCA_SAMPLE = 5_000  # training images the principal components of --pca are estimated from
PROJECT_CHUNK = 1024
_HINT = "pass --data with a CIFAR-10 archive, batches folder or .npy folder, or run `fastnet data download`"


@dataclass(frozen=True)
class Dataset:
    """Train and test splits, checked: C-contiguous uint8/float32 images, int64 labels < num_classes."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    warnings: tuple[str, ...] = ()  # oddities worth telling the user that do not stop training

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    @property
    def input_size(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.sample_shape[-1] if len(self.sample_shape) == 3 else 1


def _reason(exc: BaseException) -> str:
    """An exception as a short single line, since DataError messages must stay one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def default_data_path() -> pathlib.Path:
    """Where data lives unless --data says otherwise: $FASTNET_DATA, else ./data."""
    return pathlib.Path(os.environ.get("FASTNET_DATA") or "data")


def _kind_of(path: pathlib.Path) -> str | None:
    """The layout ``path`` itself is in, or None; a tar is recognised by content, not by name."""
    if path.is_file():
        try:
            return "archive" if tarfile.is_tarfile(path) else None
        except OSError as exc:
            raise DataError(f"cannot read {path} ({_reason(exc)}): check its permissions") from exc
    if path.is_dir():
        if all((path / name).is_file() for name in NPY_FILES):
            return "npy"
        if (path / "data_batch_1").is_file() and (path / "test_batch").is_file():
            return "batches"
    return None


def find_dataset(path: str | os.PathLike) -> tuple[str, pathlib.Path]:
    """Return ``(kind, path)`` with kind "archive", "batches" or "npy" for the data at or inside ``path``."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist: {_HINT}")
    kind = _kind_of(path)
    if kind:
        return kind, path.resolve()
    if path.is_file():
        raise DataError(f"data file {path} is not a tar archive: {_HINT}")
    # Inside a folder, prefer the fastest layout to load: npy, then unpacked batches, then the archive.
    try:
        children = sorted(child for child in path.iterdir() if child.is_dir())
    except OSError as exc:
        raise DataError(f"cannot list folder {path} ({_reason(exc)}): check its permissions") from exc
    candidates = [c for c in children if _kind_of(c) == "npy"] + [path / BATCHES_FOLDER, path / CIFAR10_ARCHIVE]
    for candidate in candidates:
        kind = _kind_of(candidate) if candidate.exists() else None
        if kind:
            return kind, candidate.resolve()
    raise DataError(
        f"no dataset found in {path}: looked for {', '.join(NPY_FILES)} (there or one folder down), "
        f"{BATCHES_FOLDER}/ with data_batch_1 and test_batch, or {CIFAR10_ARCHIVE}; {_HINT}"
    )


def load_dataset(path: str | os.PathLike | None = None) -> Dataset:
    """Find the data at ``path`` (default: :func:`default_data_path`), load and check it."""
    kind, found = find_dataset(default_data_path() if path is None else path)
    if kind == "npy":
        return _load_npy(found)
    if kind == "batches":
        return _from_batches(_folder_files(found), found, f"CIFAR-10 python batches in {found}")
    return _from_batches(_archive_files(found), found, f"CIFAR-10 archive {found}")


_BATCH_FILES = (*TRAIN_BATCHES, "test_batch", "batches.meta")


def _folder_files(folder: pathlib.Path):
    """(name, bytes) of each batch file in the folder, one at a time."""
    for name in _BATCH_FILES:
        try:
            yield name, (folder / name).read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DataError(f"cannot read {folder / name} ({_reason(exc)}): check the file") from exc


def _archive_files(path: pathlib.Path):
    """(name, bytes) of each batch file in a tar archive, in one pass (gzip cannot seek cheaply)."""
    seen = set()
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in _BATCH_FILES and name not in seen:
                    seen.add(name)
                    yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"archive {path} is truncated or corrupt ({_reason(exc)}): download it again") from exc


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays).

    Pickle can run arbitrary code, and a data file is not something users expect to be a program,
    so any other global in the stream is refused.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # _codecs: bytes in protocol 2
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # numpy 1 / 2
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        value = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # garbage bytes can make the pickle machine raise almost anything
        raise DataError(f"{where} is truncated or not a CIFAR-10 pickle ({_reason(exc)}): replace the file") from exc
    if not isinstance(value, dict):
        raise DataError(f"{where} holds a {type(value).__name__}, not a CIFAR-10 batch dict: replace the file")
    return value


def _batch_arrays(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (HWC when rows are square RGB planes, else rows) and labels of one pickled batch."""
    batch = _unpickle(raw, where)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} has no b'data' or b'labels' entry: replace it with an official CIFAR-10 batch")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{where} data is not a 2-D uint8 array (one row per image): replace the file")
    try:
        labels = np.asarray(batch[b"labels"])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} labels are not a list of integers: replace the file") from exc
    labels = _as_labels(labels, where)
    if len(labels) != len(data):  # checked per batch: opposite errors in two batches would cancel out
        raise DataError(f"{where} has {len(data)} images but {len(labels)} labels: replace the file")
    side = math.isqrt(data.shape[1] // 3)
    if data.shape[1] > 0 and 3 * side * side == data.shape[1]:
        # Rows are planar (all red, all green, all blue); the trainer wants height x width x channel.
        data = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), labels


def _from_batches(files, where: pathlib.Path, source: str) -> Dataset:
    """The dataset in the (name, bytes) pairs of `files`.

    Memory is the point here. Each file's bytes are dropped once decoded, and each training batch is
    copied into its place in one preallocated array as soon as the batches before it are in, rather
    than all five being held and then concatenated into a second copy of the images.
    """
    decoded, class_names = {}, None
    train_images, train_labels, filled = None, [], 0
    for name, raw in files:
        if name == "batches.meta":
            meta = _unpickle(raw, f"batches.meta in {where}")
            try:
                class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
            except (KeyError, TypeError, UnicodeDecodeError) as exc:
                raise DataError(f"batches.meta in {where} has no readable b'label_names': replace or delete it") from exc
            continue
        decoded[name] = _batch_arrays(raw, f"batch {name} in {where}")
        del raw
        while len(train_labels) < len(TRAIN_BATCHES) and TRAIN_BATCHES[len(train_labels)] in decoded:
            images, labels = decoded.pop(TRAIN_BATCHES[len(train_labels)])
            if train_images is None:
                # Room for every batch at the first one's size: the official batches are all equal.
                train_images = np.empty((len(TRAIN_BATCHES) * len(images), *images.shape[1:]), images.dtype)
            elif images.shape[1:] != train_images.shape[1:]:
                raise DataError(f"the training batches in {where} have different image widths: replace the odd batch")
            if filled + len(images) > len(train_images):
                train_images.resize((filled + len(images), *images.shape[1:]), refcheck=False)
            train_images[filled:filled + len(images)] = images
            filled += len(images)
            train_labels.append(labels)
    missing = [name for name in TRAIN_BATCHES[len(train_labels):] if name not in decoded]
    missing += [] if "test_batch" in decoded else ["test_batch"]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}: use a complete copy of CIFAR-10")
    train_images.resize((filled, *train_images.shape[1:]), refcheck=False)  # if later batches were smaller
    test_images, test_labels = decoded.pop("test_batch")
    return _checked(train_images, np.concatenate(train_labels), test_images, test_labels, class_names, source,
                    {"train": f"the training batches in {where}", "test": f"test_batch in {where}"},
                    f"batches.meta in {where}")


def _load_npy(folder: pathlib.Path) -> Dataset:
    arrays = {}
    for name in NPY_FILES:
        try:
            arrays[name] = np.load(folder / name, allow_pickle=False, mmap_mode=None)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{folder / name} is truncated or not a plain .npy array ({_reason(exc)}): rewrite it") from exc
        if not isinstance(arrays[name], np.ndarray):
            raise DataError(f"{folder / name} is an .npz archive, not an .npy array: save each array with np.save")
    class_names = None
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        try:
            class_names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {names_file} ({_reason(exc)}): make it UTF-8 text, one class name a line") from exc
    labels = {name: _as_labels(arrays[name], str(folder / name)) for name in NPY_FILES if "labels" in name}
    return _checked(arrays["train_images.npy"], labels["train_labels.npy"], arrays["test_images.npy"],
                    labels["test_labels.npy"], class_names, f"npy files in {folder}",
                    {split: str(folder / f"{split}_labels.npy") for split in ("train", "test")}, str(names_file))


def _as_labels(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector is a common way to save labels
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels in {where} must be integers in a 1-D array, got {labels.dtype} {labels.shape}: "
                        "save them as an integer array")
    return np.ascontiguousarray(labels, dtype=np.int64)


def _as_images(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 kept as is, floats in [0, 1] made float32; anything else refused."""
    if images.ndim not in (2, 3, 4):
        raise DataError(f"images in {where} have shape {images.shape}: expected (N, H, W, C), (N, H, W) or (N, D)")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"images in {where} are {images.dtype}: save them as uint8 0-255 or float in [0, 1]")
    images = np.ascontiguousarray(images, dtype=np.float32)  # float64 would double memory for nothing
    if images.size and not np.isfinite(images).all():
        raise DataError(f"images in {where} contain NaN or infinite values: fix or drop those images")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise DataError(f"float images in {where} range over [{images.min():g}, {images.max():g}], "
                        "not [0, 1]: divide by 255 or save them as uint8")
    return images


def _checked(train_images, train_labels, test_images, test_labels, class_names, source, label_files=None,
             names_file=None) -> Dataset:
    """The one place where every layout's arrays are checked for consistency before use. label_files
    names where each split's labels come from, names_file where class names are listed, for the
    messages."""
    label_files = label_files or {split: f"the {split} split of {source}" for split in ("train", "test")}
    splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    for split, (images, labels) in splits.items():
        images = _as_images(images, f"the {split} split of {source}")
        if len(images) == 0:
            raise DataError(f"the {split} split of {source} has no images: supply a non-empty {split} set")
        if len(images) != len(labels):
            raise DataError(f"the {split} split of {source} has {len(images)} images but {len(labels)} labels: "
                            "rebuild the files so they match")
        if labels.min() < 0:
            raise DataError(f"the {split} split of {source} has negative labels: renumber the classes 0 .. classes-1")
        splits[split] = (images, labels)
    (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"train images of {source} are {train_images.shape[1:]} but test images are "
                        f"{test_images.shape[1:]}: resize one split so both have the same sample shape")
    labels = {"train": train_labels, "test": test_labels}
    top = int(max(train_labels.max(), test_labels.max()))
    if class_names is None:
        _check_label_gaps(labels, top, label_files, names_file)
        class_names = [str(k) for k in range(top + 1)]
    if top >= len(class_names):
        split, index = _first_label_at_least(labels, len(class_names))
        raise DataError(f"{label_files[split]}: label {labels[split][index]} at index {index} is past the "
                        f"{len(class_names)} classes that {names_file or source} names: fix the label, or add "
                        f"its class to the list")
    counts = np.bincount(train_labels, minlength=len(class_names))
    empty = [f"{class_names[k]!r} ({k})" for k in np.flatnonzero(counts == 0)]
    warnings = ()
    if len(empty) == 1:
        warnings = (f"class {empty[0]} has no training examples",)
    elif empty:
        shown = ", ".join(empty[:EMPTY_CLASSES_SHOWN]) + (f" and {len(empty) - EMPTY_CLASSES_SHOWN} more"
                                                          if len(empty) > EMPTY_CLASSES_SHOWN else "")
        warnings = (f"{len(empty)} classes have no training examples: {shown}",)
    return Dataset(train_images, train_labels, test_images, test_labels, tuple(class_names), source, warnings)


EMPTY_CLASSES_SHOWN = 5


def _first_label_at_least(labels, value):
    """(split, index) of the first label >= value, the training split first."""
    for split in ("train", "test"):
        hits = np.flatnonzero(labels[split] >= value)
        if hits.size:
            return split, int(hits[0])
    raise ValueError(f"no label is {value} or more")


def _check_label_gaps(labels, top, label_files, names_file):
    """Without class names the classes are 0 .. top. A run of classes that no image has, longer than
    the number of classes below it, is almost always a mistyped label (99 among 0 .. 9), not 90 empty
    classes meant: a one-line error. Shorter gaps are legal, and reported as empty classes."""
    used = np.zeros(top + 1, bool)
    for split_labels in labels.values():
        used[split_labels] = True
    start = 0
    while start <= top:
        if used[start]:
            start += 1
            continue
        stop = start
        while not used[stop]:
            stop += 1  # used[top] is True, so this ends
        if stop - start > start:
            split, index = _first_label_at_least(labels, stop)
            listed = f"list the classes in {names_file}" if names_file else "list the class names"
            raise DataError(f"{label_files[split]}: label {labels[split][index]} at index {index} lies past "
                            f"{stop - start} classes ({start} to {stop - 1}) that no image has: fix the label, or "
                            f"{listed} when empty classes are meant")
        start = stop


def channel_stats(images: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of ``images`` scaled to [0, 1], as float32.

    Works chunk by chunk in float64, merging partial results (Chan et al.), so the memory needed stays
    that of one chunk and the variance does not suffer the cancellation of sum-of-squares formulas.
    """
    images = np.asanyarray(images)  # keeps np.memmap lazy: only one chunk is ever read into memory
    if images.ndim < 2 or len(images) == 0:
        raise DataError(f"cannot compute channel statistics of images with shape {images.shape}: need N >= 1 samples")
    channels = images.shape[-1] if images.ndim == 4 else 1
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    chunk = chunk or STATS_CHUNK
    count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, channels).astype(np.float64) * scale
        block_mean = block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta, total = block_mean - mean, count + len(block)
        mean = mean + delta * (len(block) / total)
        m2 = m2 + block_m2 + delta ** 2 * (count * len(block) / total)
        count = total
    # A constant channel would otherwise divide by ~0 when normalising and blow up the inputs.
    std = np.maximum(np.sqrt(m2 / count), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def split_validation(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``count`` random samples: returns (train_images, train_labels, val_images, val_labels)."""
    total = len(images)
    if len(labels) != total:
        raise DataError(f"cannot split {total} images with {len(labels)} labels: pass matching arrays")
    if not isinstance(count, (int, np.integer)) or not 0 < count < total:
        raise DataError(f"--val {count} must be between 1 and {total - 1}: the training set has {total} samples; pass a smaller one")
    order = rng.permutation(total)
    # Sorting keeps both parts in their original order, so epochs see a stable sequence for a seed.
    val, train = np.sort(order[:count]), np.sort(order[count:])
    return (np.ascontiguousarray(images[train]), np.ascontiguousarray(labels[train]),
            np.ascontiguousarray(images[val]), np.ascontiguousarray(labels[val]))


def principal_components(images: np.ndarray, shift: np.ndarray, scale: np.ndarray, count: int,
                         rng: np.random.Generator, kernels, sample: int | None = None,
                         mirrored: tuple[int, ...] | None = None) -> np.ndarray:
    """The ``count`` directions in which the standardised images, ``(images - shift) * scale``, vary
    most: an (input_size, count) matrix of orthonormal columns in decreasing order of variance, in
    the dtype of ``shift``.

    They are estimated from ``sample`` images (default PCA_SAMPLE) that ``rng`` draws. For CIFAR-10,
    5,000 images trained networks as accurate as 10,000 or 20,000 did, in less time and memory.

    With ``mirrored``, the shape of one image ((H, W, C) or (H, W)), they are the components of the
    images together with their mirror images. Each is then mirror-symmetric or antisymmetric (see
    mirror_signs), so that flipping an image only changes the sign of some of its components.
    """
    flat = images.reshape(len(images), -1)
    size = flat.shape[1]
    rows = np.sort(rng.choice(len(flat), size=min(sample or PCA_SAMPLE, len(flat)), replace=False))
    if not 0 < count < min(size, len(rows)) + 1:
        raise DataError(f"--pca {count} asks for more components than {len(rows)} images of {size} inputs "
                        f"can give: pass at most {min(size, len(rows))}")
    standardised = np.empty((len(rows), size), shift.dtype)
    kernels.gather_normalize(flat, rows, shift, scale, standardised)
    mean = standardised.mean(axis=0)
    mirror = None if mirrored is None else mirror_permutation(mirrored)
    standardised -= mean if mirror is None else (mean + mean[mirror]) / 2
    covariance = np.dot(standardised.T, standardised) / len(rows)
    del standardised
    if mirror is None:
        vectors = _top_eigenpairs(covariance, count)[1]
    else:
        # With the mirror images, the covariance is (C + M C M) / 2 for the flip M; its eigenvectors
        # are symmetric or antisymmetric. Solving in each of those two subspaces on its own keeps them
        # exactly so, where one solve would mix two of nearly equal variance.
        values, vectors = [], []
        for basis in _mirror_bases(mirror, covariance.dtype):
            if basis.shape[1]:
                found = _top_eigenpairs(basis.T @ covariance @ basis, min(count, basis.shape[1]))
                values.append(found[0])
                vectors.append(basis @ found[1])
        vectors = np.hstack(vectors)[:, np.argsort(-np.concatenate(values), kind="stable")[:count]]
    # LAPACK may return either sign of an eigenvector; fixing one keeps runs independent of that.
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(count)])
    return np.ascontiguousarray(vectors, dtype=shift.dtype)


def _top_eigenpairs(symmetric: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues of a symmetric matrix, largest first, and their eigenvectors.
    Only those are computed: for 512 of 3072, three times faster than all of them."""
    size = len(symmetric)
    values, vectors = scipy.linalg.eigh(symmetric, subset_by_index=(size - count, size - 1))
    return values[::-1], vectors[:, ::-1]


def mirror_permutation(image_shape: tuple[int, ...]) -> np.ndarray:
    """mirror[i]: the feature of a flattened (H, W, C) or (H, W) image that a left-right flip moves to
    feature i. A flip swaps the two, so mirror is its own inverse."""
    features = np.arange(math.prod(image_shape)).reshape(image_shape[0], image_shape[1], -1)
    return features[:, ::-1].reshape(-1)


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


def mirror_signs(components: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """+1 for each column of ``components`` that a left-right flip of the image leaves as it is, -1 for
    each that it negates, in the components' dtype. Only components fitted with ``mirrored`` are
    all one or the other; anything else is a ValueError."""
    alignment = np.einsum("ij,ij->j", components, components[mirror_permutation(image_shape)], dtype=np.float64)
    if np.any(np.abs(np.abs(alignment) - 1) > 1e-3):
        raise ValueError("these components are not mirror-symmetric or antisymmetric: fit them with mirrored=")
    return np.sign(alignment).astype(components.dtype)


def project(images: np.ndarray, shift: np.ndarray, scale: np.ndarray, projection: np.ndarray, kernels,
            chunk: int = PROJECT_CHUNK) -> np.ndarray:
    """``((images - shift) * scale) @ projection`` as an (N, projection.shape[1]) array, computed with
    the backend's kernels one chunk at a time, so that the standardised pixels never exist all at once."""
    flat = images.reshape(len(images), -1)
    out = np.empty((len(flat), projection.shape[1]), projection.dtype)
    standardised = np.empty((min(chunk, len(flat)), flat.shape[1]), projection.dtype)
    no_bias = np.zeros(projection.shape[1], projection.dtype)
    for start in range(0, len(flat), chunk):
        stop = min(start + chunk, len(flat))
        rows = standardised[:stop - start]
        kernels.gather_normalize(flat, np.arange(start, stop), shift, scale, rows)
        kernels.dense_forward(rows, projection, no_bias, out[start:stop])
    return out


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(to: str | os.PathLike | None = None, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5,
             progress: bool = True, timeout: float = 30.0) -> pathlib.Path:
    """Download ``url`` into folder ``to`` (resuming a partial download), check its md5, return its path."""
    folder = pathlib.Path(to) if to is not None else default_data_path()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create folder {folder} ({_reason(exc)}): pass a writable folder") from exc
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or CIFAR10_ARCHIVE
    final, part = folder / name, folder / (name + ".part")
    if final.is_file() and _md5(final) == md5:
        return final
    try:
        _fetch(url, part, progress, timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"could not download {url}: the server answered {_reason(exc)}; download {name} "
                        f"elsewhere and put it in {folder}, or pass --data PATH to a local copy") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts and resets are all OSError
        reason = _reason(exc.reason if isinstance(exc, urllib.error.URLError) else exc)
        raise DataError(f"could not download {url} ({reason}): you seem to be offline; download {name} "
                        f"elsewhere and put it in {folder}, or pass --data PATH to a local copy") from exc
    actual = _md5(part)
    if actual != md5:
        part.unlink()
        raise DataError(f"download of {url} has md5 {actual}, expected {md5}: the file is corrupt or not "
                        "the expected one; run the download again or fetch it by hand")
    os.replace(part, final)  # atomic, so a file under the final name is always complete
    return final


def _fetch(url: str, part: pathlib.Path, progress: bool, timeout: float) -> None:
    """Fill ``part`` with the bytes of ``url``, continuing from what it already holds if the server lets us."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fastnet"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if offset and exc.code == 416:  # nothing left past offset: the part is whole, the md5 will tell
            return
        raise
    with response:
        if response.status != 206 or not (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
            offset = 0  # the server sent the whole file: start over rather than append it
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            out = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise DataError(f"cannot write {part} ({_reason(exc)}): pass a writable folder") from exc
        with out, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=part.name[:-5], disable=not progress) as bar:
            while block := response.read(1 << 16):
                try:
                    out.write(block)
                except OSError as exc:
                    raise DataError(f"cannot write {part} ({_reason(exc)}): free some disk space") from exc
                bar.update(len(block))
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes; run again to resume")


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
        if len(image_shape) not in (2, 3):
            raise ValueError(f"augmentation needs images of shape (H, W, C) or (H, W), got samples of shape "
                             f"{tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape) + ((1,) if len(image_shape) == 2 else ())
        self.flip, self.translate, self.cutout = bool(flip), int(translate), int(cutout)
        if self.translate < 0 or self.cutout < 0:
            raise ValueError(f"translate and cutout must be 0 or more, got {translate} and {cutout}")
        self._capacity = 0

    @property
    def enabled(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0

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
