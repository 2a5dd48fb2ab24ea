"""An image tree as a dataset: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``, one folder per class,
and optionally ``ROOT/val/<class>/*``, a validation split that replaces --val.

This is how most people keep labelled pictures (torchvision's ImageFolder and Keras's
image_dataset_from_directory read the same layout). Class names are the folder names of ``train/``,
sorted, and a class's label is its place in that order. Every image is read by fastnet.images.decode,
the rules `fastnet predict` uses, and becomes RGB: grey and palette images are converted, and
transparent pixels are put on white. All images must have one size, or be resized to one
(``image_size``, --image-size HxW: stretched with Pillow's Lanczos filter, as `fastnet predict` does).

Decoding tens of thousands of small files is Python-bound, so it is spread over processes (threads
would contend for the GIL around each small decode), and the decoded arrays are cached under fastnet's
cache folder, keyed by each file's path, size and modification time, so the next run starts at once
and a changed, added or removed file is noticed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import signal
import sys
import threading

import numpy as np

from fastnet import settings, storage
from fastnet.errors import DataError, SettingError
from fastnet.images import IMAGE_SUFFIXES, ImageError, decode, regular_file, resize, shown, unfollowed, walk

# How files become pixels, part of the cache key: change it whenever the decoded arrays would change.
RULE = "RGB; EXIF orientation; 16-bit grey scaled; transparent on white; v1"
MODE = "RGB"
CHUNK = 256  # files per task: enough that a task's overhead is small, few enough that the bar moves


def cache_folder() -> pathlib.Path:
    """Where decoded image trees are kept: $FASTNET_CACHE, else $XDG_CACHE_HOME/fastnet, else
    ~/.cache/fastnet; never inside the user's image folder."""
    given = os.environ.get("FASTNET_CACHE")
    if given:
        return pathlib.Path(given).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "fastnet"


def is_image_tree(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "train").is_dir()


@dataclasses.dataclass
class _Listing:
    """The image files of one split: paths relative to the tree's root, sorted, and their labels."""

    files: list  # (relative path, size, mtime_ns)
    labels: list
    skipped: list  # relative paths of files that are not images by name
    loops: list = dataclasses.field(default_factory=list)  # links to folders not followed (images.walk)


def _entries(folder: pathlib.Path):
    try:
        return sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {folder} ({exc.strerror}): check its permissions") from exc


def _class_folders(split: pathlib.Path, skipped: list, root: pathlib.Path):
    classes = []
    for entry in _entries(split):
        if entry.is_dir():
            classes.append(entry.name)
        else:
            skipped.append(os.path.relpath(entry.path, root))  # a file outside any class folder
    if not classes:
        raise DataError(f"{split} has no class folders: make one folder per class in it, {split}/<class>/, "
                        f"and put that class's images there")
    return classes


def _list_split(root: pathlib.Path, split: str, classes: list) -> _Listing:
    listing = _Listing([], [], [])
    for label, name in enumerate(classes):
        folder = root / split / name
        # Subfolders of a class folder are read too, and links to folders followed, but for one that
        # would loop or read a folder twice (fastnet.images.walk, as fastnet predict walks a folder).
        files, skipped, loops = walk(folder, tree=root / split)  # a link to another class: not followed
        prefix = os.path.relpath(folder, root)
        listing.skipped += [os.path.join(prefix, name) for name in skipped]
        listing.loops += [os.path.join(prefix, name) for name in loops]
        for file_name in files:
            relative = os.path.join(prefix, file_name)
            path = os.path.join(root, relative)
            stat = regular_file(path)  # a named pipe, a device or a link that loops: refused before decoding
            listing.files.append((relative, stat.st_size, stat.st_mtime_ns))
            listing.labels.append(label)
        if not files:
            raise DataError(f"{folder} has no image files ({' '.join(IMAGE_SUFFIXES)}, any case): put the class's "
                            f"images in it, or drop the folder")
    return listing


def _warnings(root: pathlib.Path, skipped: list, loops: list) -> list:
    warnings = []
    if skipped:
        noun = "file" if len(skipped) == 1 else "files"
        verb = "is" if len(skipped) == 1 else "are"
        warnings.append(f"skipped {len(skipped)} {noun} in {root} that {verb} not an image by name or not in a "
                        f"class folder: {shown(skipped)}")
    if loops:
        warnings.append(unfollowed(root, loops, "read"))
    return warnings


def hold_out(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the samples held out as the test split: round(fraction * n) of each class's
    n, drawn by `rng` class by class, but never a class's last sample, which stays to be trained on."""
    held = np.zeros(len(labels), bool)
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == label)
        count = min(round(fraction * len(members)), max(len(members) - 1, 0))
        held[members[rng.permutation(len(members))[:count]]] = True
    return held


def load_image_tree(root, test_fraction: float = 0.0, rng=0, workers: int | None = None, image_size=None):
    """The Dataset of the image tree at `root`. Without ``root/test/``, ``test_fraction`` of each
    class of ``train/`` is held out as the test split, drawn by ``rng`` (a Generator, or a seed).
    ``image_size`` (height, width), or "HxW", resizes every image; without it all must have one size.
    ``workers`` processes decode the files (default: the cores this process may run on; 1: no pool)."""
    from fastnet.data.layouts import _checked

    root = pathlib.Path(root).expanduser().resolve()
    test_fraction = settings.test_fraction("test_fraction", test_fraction)
    image_size = settings.image_size("image_size", image_size)
    skipped = []
    classes = _class_folders(root / "train", skipped, root)
    train = _list_split(root, "train", classes)
    skipped += train.skipped
    loops = list(train.loops)
    notes = ()
    if (root / "test").is_dir():
        if test_fraction:
            raise SettingError("test_fraction", f"{{setting}} holds out a test split from train/ when a tree has no "
                                                f"test/ folder, and {root} has one: drop {{setting}}")
        test = _list_other(root, "test", classes, skipped)
    elif not test_fraction:
        raise DataError(f"{root} has train/ but no test/ folder: make {root / 'test'}/<class>/ folders of test "
                        f"images, or pass --test-fraction 0.1 to hold out a tenth of train/, stratified by class")
    else:
        held = hold_out(np.asarray(train.labels, np.int64), test_fraction, np.random.default_rng(rng))
        if not held.any():
            raise SettingError("test_fraction", f"{{setting}} {test_fraction:g} of the {len(held)} images of "
                                                f"{root / 'train'} holds out none: pass a larger fraction")
        test = _Listing([f for f, h in zip(train.files, held, strict=True) if h],
                        [y for y, h in zip(train.labels, held, strict=True) if h], [])
        train = _Listing([f for f, h in zip(train.files, held, strict=True) if not h],
                         [y for y, h in zip(train.labels, held, strict=True) if not h], [])
        notes = ((f"held out {held.sum()} of the {len(held)} images of {root / 'train'} as the test split "
                  f"(--test-fraction {test_fraction:g}, stratified by class, drawn with --seed)"),)
    listings = {"train": train, "test": test}
    if (root / "val").is_dir():
        listings["val"] = _list_other(root, "val", classes, skipped)
    reference = _reference(root, train.files[0][0], image_size)
    loops += [path for split, listing in listings.items() if split != "train" for path in listing.loops]
    warnings = _warnings(root, skipped, loops)
    arrays = {}
    for split, listing in listings.items():
        images, problem = _cached_or_decoded(root, split, listing.files, reference, workers)
        arrays[split] = images
        warnings += [problem] if problem else []
    labels = {split: np.asarray(listing.labels, np.int64) for split, listing in listings.items()}
    resized = f", resized to {image_size[0]}x{image_size[1]}" if image_size else ""
    dataset = _checked(arrays["train"], labels["train"], arrays["test"], labels["test"], classes,
                       f"image tree {root}{resized}")
    return dataclasses.replace(dataset, warnings=(*warnings, *dataset.warnings), notes=notes,
                               val_images=arrays.get("val"), val_labels=labels.get("val"))


def _list_other(root, split, classes, skipped):
    """test/'s or val/'s files, labelled by train/'s classes: a class of train/ that the split lacks
    simply has no images there, but a class that train/ lacks could never be learnt."""
    listing = _Listing([], [], [])
    for name in _class_folders(root / split, skipped, root):
        if name not in classes:
            raise DataError(f"{root / split / name} is a class that {root / 'train'} lacks: use the same class "
                            f"folders in both, or drop it from {split}/")
        part = _list_split(root, split, [name])
        listing.files += part.files
        listing.labels += [classes.index(name)] * len(part.files)
        listing.loops += part.loops
        skipped += part.skipped
    return listing


# --- Decoding, in parallel, and the cache -------------------------------------------------------------

def _reference(root: pathlib.Path, relative: str, image_size=None):
    """(relative path, shape, resize) for decode_files: the shape every image must have, which is the
    first training image's, and whether images are resized to it (image_size given) or refused."""
    if image_size:
        return relative, (*image_size, 3), True
    return relative, decode(str(root / relative), MODE).shape, False


def _size_error(root, relative, shape, reference):
    def size(s):
        return f"{s[0]}x{s[1]}"
    return ImageError(f"images of one tree must have one size, but {root / relative} is {size(shape)} and "
                      f"{root / reference[0]} is {size(reference[1])} (height x width): pass --image-size HxW "
                      f"(for example --image-size {size(reference[1])}) to resize them all to one")


def decode_files(root, files, reference):
    """The images at these paths under `root`, stacked: (len(files), *reference shape) uint8. A
    process pool's task, so it takes and returns only what pickles cheaply."""
    root = pathlib.Path(root)
    _, shape, resizing = reference
    images = np.empty((len(files), *shape), np.uint8)
    for i, relative in enumerate(files):
        pixels = decode(str(root / relative), MODE)
        if pixels.shape != shape:
            if not resizing:
                raise _size_error(root, relative, pixels.shape, reference)
            pixels = resize(pixels, *shape[:2])
        images[i] = pixels
    return images


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


# The pool that decodes: processes, which measured faster than threads (benchmarks/RESULTS.md).
EXECUTOR = concurrent.futures.ProcessPoolExecutor


def _leave_interrupts_to_the_parent():
    """Ctrl-C reaches every process of the terminal's group. A worker interrupted inside the pool's
    queue can leave it locked and the pool hung, so workers ignore SIGINT: the parent stops, drops the
    chunks not started, and waits for the few that are (a thread pool has nothing to change)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_all(root, files, reference, workers=None, label="decoding"):
    """decode_files over every file, spread over `workers` processes, with a progress bar on a terminal."""
    from tqdm import tqdm

    workers = workers or default_workers()
    images = np.empty((len(files), *reference[1]), np.uint8)
    chunks = [range(start, min(start + CHUNK, len(files))) for start in range(0, len(files), CHUNK)]
    with tqdm(total=len(files), unit="img", desc=label, disable=not sys.stderr.isatty(), leave=False) as bar:
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                images[chunk.start:chunk.stop] = decode_files(root, files[chunk.start:chunk.stop], reference)
                bar.update(len(chunk))
            return images
        pool = EXECUTOR(max_workers=min(workers, len(chunks)), initializer=_leave_interrupts_to_the_parent)
        try:
            pending = {pool.submit(decode_files, str(root), files[chunk.start:chunk.stop], reference): chunk
                       for chunk in chunks}
            for done in concurrent.futures.as_completed(pending):
                chunk = pending.pop(done)
                images[chunk.start:chunk.stop] = done.result()
                bar.update(len(chunk))
        finally:
            # On a bad file or Ctrl-C, the chunks not yet started are dropped rather than decoded for nothing.
            pool.shutdown(wait=True, cancel_futures=True)
    return images


def cache_key(files, shape=None) -> str:
    """The cache file's name: a hash of the files (path, size, mtime), the rule and the size resized to."""
    listing = json.dumps({"rule": RULE, "resized to": shape, "files": [list(f) for f in files]}, separators=(",", ":"))
    return hashlib.sha256(listing.encode()).hexdigest()


def _cached_or_decoded(root, split, files, reference, workers):
    """(images, warning or None): from the cache when the same files were decoded before, else decoded
    and cached. The cache file appears under its name only once complete."""
    folder = cache_folder() / "images"
    path = folder / f"{cache_key(files, reference[1] if reference[2] else None)}.npy"
    try:
        images = np.load(path, allow_pickle=False)
        if images.dtype == np.uint8 and images.shape == (len(files), *reference[1]):
            return images, None
    except (OSError, ValueError, EOFError, MemoryError):  # MemoryError: a header declaring more than there is
        pass  # absent, or damaged by something other than fastnet: decode again
    images = decode_all(root, [f[0] for f in files], reference, workers, label=f"decoding {split}/")
    temporary = folder / f".{path.stem}.{os.getpid()}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as out:
            np.save(out, images, allow_pickle=False)
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            temporary.unlink()
        except OSError:
            pass  # never made, or its folder could not be: nothing to remove
        if not isinstance(exc, OSError):
            raise  # Ctrl-C while writing: no half-written file is left, under any name
        # A warning, not an error: the images are decoded, and the run needs no cache to go on.
        advice = "set FASTNET_CACHE to a writable folder"
        fault = storage.remedy(path, exc)
        if fault is not None:
            advice = f"{fault}, or set FASTNET_CACHE to a folder on another disk"
        return images, (f"could not cache the decoded images in {folder} ({exc.strerror}), so the next run decodes "
                        f"them again: {advice}")
    return images, None
