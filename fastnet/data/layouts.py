"""Finding, loading and checking a data set on disk: CIFAR-10, or any small image set in the same layouts.

Four layouts are understood, so people can use whatever they already have on disk: a tree of
image files, one folder per class (fastnet.data.folders reads it), the official
``cifar-10-python.tar.gz`` (read in place, never unpacked), its unpacked ``cifar-10-batches-py/``
folder, and a folder of four ``.npy`` files. Whatever the layout, the result is a :class:`Dataset`
checked by one function, so the trainer never sees a malformed array and every problem reaches the
user as a one-line :class:`DataError` instead of a traceback.
"""

from __future__ import annotations

import io
import lzma
import math
import os
import pathlib
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from fastnet import settings
from fastnet.data import folders
from fastnet.errors import DataError, SettingError

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
NPY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
# What a message calls each layout but an image tree.
LAYOUT_NAMES = {"npy": "a folder of .npy files", "batches": "a CIFAR-10 batches folder",
                "archive": "a CIFAR-10 archive"}
_HINT = ("pass --data with a folder of class folders (train/<class>/, test/<class>/), a CIFAR-10 archive, batches "
         "folder or .npy folder, or run `fastnet data download`")


@dataclass(frozen=True)
class Dataset:
    """Train and test splits, checked: C-contiguous uint8/float32 images, int64 labels < num_classes. The loaders
    always give a test split; a driver's in-memory data (fastnet.sklearn) may have none (test_images None)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    warnings: tuple[str, ...] = ()  # oddities worth telling the user that do not stop training
    notes: tuple[str, ...] = ()  # what was done to the data that the user should know (a held-out test split)
    val_images: np.ndarray | None = None  # a validation split of its own (an image tree's val/), used in place of --val
    val_labels: np.ndarray | None = None

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
        if folders.is_image_tree(path):
            return "images"
    return None


def find_dataset(path: str | os.PathLike) -> tuple[str, pathlib.Path]:
    """Return ``(kind, path)`` with kind "images", "archive", "batches" or "npy" for the data at or inside ``path``.
    An image tree is recognised at ``path`` itself only: a folder with a ``train/`` subfolder."""
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
        f"no dataset found in {path}: looked for train/ of class folders, {', '.join(NPY_FILES)} "
        f"(there or one folder down), "
        f"{BATCHES_FOLDER}/ with data_batch_1 and test_batch, or {CIFAR10_ARCHIVE}; {_HINT}"
    )


def load_dataset(path: str | os.PathLike | None = None, test_fraction: float = 0.0, rng=0,
                 image_size=None) -> Dataset:
    """Find the data at ``path`` (default: :func:`default_data_path`), load and check it.

    For an image tree only: ``test_fraction`` holds out that share of each class as the test split when
    it has no ``test/``, drawn by ``rng`` (a np.random.Generator, or a seed); ``image_size``,
    (height, width) or "HxW", resizes every image."""
    kind, found = find_dataset(default_data_path() if path is None else path)
    if kind == "images":
        return folders.load_image_tree(found, test_fraction, rng, image_size=image_size)
    if settings.test_fraction("test_fraction", test_fraction):
        raise SettingError("test_fraction", f"{{setting}} holds out a test split from an image tree without a test/ "
                                            f"folder, and {found} is {LAYOUT_NAMES[kind]} with its own: drop "
                                            f"{{setting}}")
    if settings.image_size("image_size", image_size):
        raise SettingError("image_size", f"{{setting}} resizes the images of an image tree, and {found} is "
                                         f"{LAYOUT_NAMES[kind]}, whose images are arrays already: drop {{setting}}")
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
                raise DataError(f"batches.meta in {where} has no readable b'label_names': "
                                "replace or delete it") from exc
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
            raise DataError(f"{folder / name} is truncated or not a plain .npy array ({_reason(exc)}): "
                            "rewrite it") from exc
        except MemoryError as exc:  # what its header declares: the bytes are never read
            raise DataError(f"{folder / name} declares an array larger than this machine's memory ({_reason(exc)}): "
                            f"if the file is smaller than that, it is truncated or corrupt, so rewrite it; else train "
                            f"on fewer images or on a machine with more memory") from exc
        if not isinstance(arrays[name], np.ndarray):
            raise DataError(f"{folder / name} is an .npz archive, not an .npy array: save each array with np.save")
    class_names = None
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        try:
            class_names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {names_file} ({_reason(exc)}): make it UTF-8 text, "
                            "one class name a line") from exc
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
        _check_test_classes(labels, label_files, names_file)
        class_names = [str(k) for k in range(top + 1)]
    if top >= len(class_names):
        split, index = _first_label_at_least(labels, len(class_names))
        raise DataError(f"{label_files[split]}: label {labels[split][index]} at index {index} is past the "
                        f"{len(class_names)} classes that {names_file or source} names: fix the label, or add "
                        f"its class to the list")
    counts = np.bincount(train_labels, minlength=len(class_names))
    if np.count_nonzero(counts) < 2:
        only = int(train_labels[0])
        raise DataError(f"{label_files['train']}: all labels are of one class, {class_names[only]!r} ({only}), and a "
                        f"classifier learns to tell two or more apart: supply training images of at least one other "
                        f"class")
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


def _check_test_classes(labels, label_files, names_file):
    """Without class names the classes are the labels' numbers, and a number that only the test split
    has is a class the network is never trained on, so it gets every test image of it wrong: almost
    always a split made by class (train 0 to 7, test 8 and 9) or a typo. With the names, it is a
    class meant to have no training images, and only reported."""
    unseen = np.flatnonzero(~np.isin(labels["test"], labels["train"]))
    if unseen.size:
        index = int(unseen[0])
        listed = f"list the classes in {names_file}" if names_file else "list the class names"
        raise DataError(f"{label_files['test']}: label {labels['test'][index]} at index {index} is a class that no "
                        f"training image has, so it cannot be learnt: fix the label, or {listed} when a class "
                        f"without training images is meant")


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
