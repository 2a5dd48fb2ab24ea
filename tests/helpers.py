"""The two comparisons every numerical test in fastnet goes through, and where the real data is."""

import os
import pathlib
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastnet import data
from fastnet.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def assert_close(actual, expected, rtol, atol=0.0, dtype=None):
    """actual matches expected in shape, in dtype (`dtype`, or expected's when it is an array) and in
    value to within atol + rtol * |expected|."""
    actual = np.asarray(actual)
    expected_array = np.asarray(expected)
    assert actual.shape == expected_array.shape, f"shape {actual.shape} != {expected_array.shape}"
    want = np.dtype(dtype) if dtype is not None else expected_array.dtype
    assert actual.dtype == want, f"dtype {actual.dtype} != {want}"
    np.testing.assert_allclose(actual, expected_array, rtol=rtol, atol=atol)


def numerical_gradient(f, x, eps=1e-6):
    """dF/dx by centred finite differences of the scalar function f(), perturbing x in place."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)
    assert np.shares_memory(flat_x, x), "x must be contiguous so it can be perturbed in place"
    for i in range(flat_x.size):
        original = flat_x[i]
        flat_x[i] = original + eps
        plus = f()
        flat_x[i] = original - eps
        minus = f()
        flat_x[i] = original
        flat_grad[i] = (plus - minus) / (2 * eps)
    return grad


def relative_error(a, b):
    """max |a - b| / max(|a| + |b|), the usual gradient-check measure; 0 when both are 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(a) + np.abs(b))
    return 0.0 if scale == 0 else float(np.max(np.abs(a - b)) / scale)


def real_data_path():
    """Where the real CIFAR-10 is: $FASTNET_TEST_DATA, else data/ when a dataset is there."""
    given = os.environ.get("FASTNET_TEST_DATA")
    path = pathlib.Path(given or ROOT / "data")
    try:
        data.find_dataset(path)
    except DataError:
        if given:
            unavailable(f"FASTNET_TEST_DATA={given} holds no CIFAR-10: point it at the folder that "
                        f"tools/build_test_data.sh wrote (see docs/testing.md)")
        unavailable(f"no CIFAR-10 in {path} and FASTNET_TEST_DATA is not set: put the dataset in {path} "
                    f"(fastnet data download) or set FASTNET_TEST_DATA (see docs/testing.md)")
    return path


def unavailable(message):
    """Skip a test whose data is missing on a developer's machine; under CI, fail it instead."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Float64Detector:
    """Wraps a backend so that every kernel call fails the test if an array argument is float64,
    which in a float32 run could only come from a silent upcast, or if its result is a NumPy float64
    (the kernels return None, or a Python number)."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0

    def __getattr__(self, name):
        kernel = getattr(self.backend, name)

        def checked(*args):
            self.calls += 1
            for position, arg in enumerate(args):
                assert getattr(arg, "dtype", None) != np.float64, f"{name}: argument {position} is float64"
            result = kernel(*args)
            assert getattr(result, "dtype", None) != np.float64, f"{name} returned float64"
            return result

        return checked


def save_brightness_classes(folder, rng, counts, side, step, base, noise):
    """A synthetic 3-class npy dataset in `folder`: each class a brightness level (base + class *
    step) under Gaussian noise, side x side x 3 uint8 images; counts is {split: images}."""
    for split, count in counts.items():
        labels = rng.integers(0, 3, count)
        images = np.clip(labels[:, None, None, None] * step + base + rng.normal(0, noise, (count, side, side, 3)), 0,
                         255)
        np.save(pathlib.Path(folder) / f"{split}_images.npy", images.astype(np.uint8))
        np.save(pathlib.Path(folder) / f"{split}_labels.npy", labels.astype(np.uint8))
    return folder


# --- Small datasets in the layouts users keep CIFAR-10 in (test_data, test_download, test_reliability) ---

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_BATCH, TEST_COUNT = 7, 5


def make_arrays(seed=0):
    """35 train and 5 test random 32x32 RGB images; train labels hit every class."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (5 * PER_BATCH, 32, 32, 3), dtype=np.uint8),
        "train_labels": rng.permutation(np.arange(5 * PER_BATCH) % 10).astype(np.int64),
        "test_images": rng.integers(0, 256, (TEST_COUNT, 32, 32, 3), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, TEST_COUNT).astype(np.int64),
    }


def _batch_bytes(images, labels, name):
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # official rows: R plane, G plane, B plane
    batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in labels], b"data": planar,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
    return pickle.dumps(batch, protocol=3)


def write_batches(folder, arrays, names=CLASSES):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(5):
        rows = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
        (folder / f"data_batch_{b + 1}").write_bytes(
            _batch_bytes(arrays["train_images"][rows], arrays["train_labels"][rows], f"batch {b + 1}"))
    (folder / "test_batch").write_bytes(_batch_bytes(arrays["test_images"], arrays["test_labels"], "test"))
    if names is not None:
        meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": PER_BATCH}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=3))
    return folder


def write_archive(path, arrays, top="cifar-10-batches-py"):
    path = pathlib.Path(path)
    folder = write_batches(path.parent / "_staging" / "cifar-10-batches-py", arrays)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname=top)
    return path


def write_npy(folder, arrays, names=None):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)
    if names is not None:
        (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


# --- Small image trees, every file kind a user's folder may hold (test_folders, test_reliability) -------

SIZE = (5, 6)  # height, width
# (suffix, Pillow mode) of the files of a class, in turn: every mode a user's folder may hold.
KINDS = ((".png", "RGB"), (".PNG", "L"), (".Png", "P"), (".png", "RGBA"), (".JPG", "RGB"), (".bmp", "RGB"),
         (".jpeg", "L"), (".GIF", "P"))
JUNK = (".DS_Store", "Thumbs.db", "notes.txt")


def save_image(path, mode, rng, size=SIZE):
    pixels = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
    picture = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        picture = picture.convert("RGB").quantize(8)
        picture.info["transparency"] = 0  # palette index 0 is transparent
    elif mode != "RGBA":
        picture = picture.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, **({"transparency": 0} if mode == "P" else {}))
    return path


def make_tree(root, rng, classes=("zebra", "Moth", "ant"), counts=None, splits=("train", "test")):
    """A tree whose classes are made out of order, with every kind of file; returns root."""
    counts = counts or {"train": 9, "test": 4}
    for split in splits:
        for name in classes:
            for i in range(counts[split]):
                suffix, mode = KINDS[i % len(KINDS)]
                save_image(root / split / name / f"{i:03d}{suffix}", mode, rng)
    for junk in JUNK:
        (root / "train" / classes[0] / junk).write_bytes(b"\x00 not an image")
    return root


# --- The real command, in a subprocess, as a user runs it ------------------------------------------

# A sweep's search space for the tests: lr from hopeless (1e-5) to fast, so that a seeded search draws
# some of each and the hopeless get pruned.
SWEEP_SPACE = """
[lr]
low = 1e-5
high = 0.2
log = true

[dropout]
low = 0.0
high = 0.3
"""


def fastnet(*args, env=None, cwd=None):
    command, options = _command(args, env)
    return subprocess.run(command, **options, capture_output=True, text=True, cwd=cwd, timeout=600)


def start_fastnet(*args, env=None):
    """The command, started and not waited for: a Popen with stdout and stderr as text pipes, in a
    session of its own, so that os.killpg reaches it and its children as Ctrl-C in a terminal does."""
    command, options = _command(args, env)
    return subprocess.Popen(command, **options, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _command(args, env):
    # FASTNET_CACHE is kept: conftest points it at a temporary folder so that tests never fill ~/.cache.
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("FASTNET_") or k == "FASTNET_CACHE"} | (env or {})
    return [sys.executable, "-m", "fastnet", *map(str, args)], {"env": environment}


def assert_one_line_error(result, *phrases):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastnet: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
