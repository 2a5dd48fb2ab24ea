"""What several test files share: the two comparisons every numerical test goes through, where the real
data is, the machinery that compares a backend's kernels with their NumPy twins, small datasets and
image trees in the layouts users keep, files made to hurt (a decompression bomb's header, a sparse
huge file), and the real command run in a subprocess."""

import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import pathlib
import pickle
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from hypothesis import example, settings
from hypothesis import strategies as st
from PIL import Image

from fastnet import backends, data
from fastnet.activations import ACTIVATIONS
from fastnet.backends import numpy_backend as ref
from fastnet.errors import DataError
from fastnet.run_folder import TIMING_METRICS

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


# --- A backend's kernels against their NumPy twins (test_kernel_twins_*, test_model, test_kernels) ------
#
# Tolerances (see assert_matches). float64 results must agree to FLOAT64_TOL: far looser than float64
# rounding, far tighter than any real mistake. float32 results get float32_tol(K), where K is the length
# of the sums the kernel computes; elementwise kernels have K = 1. Both are relative, plus an absolute
# part of the same size times the scale of the result (for a sum, of its terms), for values near 0.
# bfloat16 results (uint16 arrays) are compared by value, to within one bf16 ulp, 2^-7 relative: each
# is the rounding of a float32 result that agrees to float32_tol, and a rounding flips at most one ulp.
# Their rounding itself is tested bit for bit.

OTHER_BACKENDS = [name for name in backends.available() if name != "numpy"]

# Numba warns that BLAS is faster on contiguous arrays when the tests pass strided ones on purpose.
STRIDED_ON_PURPOSE = ([pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]
                      if importlib.util.find_spec("numba") else [])


EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7, the spacing of float32 numbers at 1
FLOAT64_TOL = 1e-12
BF16_ULP = 2.0 ** -7  # the largest spacing of bfloat16 numbers relative to their value (at 1: 2^-7)


def float32_tol(reduction_length):
    """The relative tolerance for two float32 computations of a sum of `reduction_length` terms.

    Each addition rounds to within EPS32 / 2 of the running total. Rounding errors of random data
    behave like independent random signs, so over K additions they grow like sqrt(K) * EPS32 times
    the size of the running totals (the worst case, K * EPS32, needs every rounding to go the same
    way). Two implementations err independently, which doubles the bound, and a margin of 2 makes 4.
    Measured on this project's kernels, numpy's own float32 GEMM stays within 0.3 sqrt(K) EPS32 of the
    exact result. Elementwise kernels are K = 1: a few ulps.
    """
    return 4 * math.sqrt(max(reduction_length, 1)) * EPS32


def assert_matches(actual, expected, reduction_length, what, magnitude=None):
    """actual == expected in shape and dtype, and in value to within the tolerance of expected's dtype.

    reduction_length None means exactly (integers, selections, inputs that must be left alone). The
    absolute part of the tolerance is the relative one times a scale: a result near 0 is a sum that
    cancelled, and its rounding error is that of the terms, not of the result. The scale is the
    largest of `magnitude` (for a sum: the sum of its terms' absolute values, see term_magnitudes)
    and |expected|.
    """
    expected = np.asarray(expected)
    if expected.dtype == np.uint16 and reduction_length is not None:  # bfloat16 results, by value
        actual, expected = bf16_values(np.asarray(actual)), bf16_values(expected)
        rtol = BF16_ULP + float32_tol(reduction_length)
    elif reduction_length is None or not np.issubdtype(expected.dtype, np.floating):
        rtol = 0.0
    elif expected.dtype == np.float64:
        rtol = FLOAT64_TOL
    else:
        rtol = float32_tol(reduction_length)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if magnitude is not None and np.size(magnitude):
        scale = max(scale, float(np.max(magnitude)))
    try:
        assert_close(actual, expected, rtol=rtol, atol=rtol * scale if rtol else 0.0)  # a NaN scale stays out
    except AssertionError as exc:
        raise AssertionError(f"{what}, shape {expected.shape} {expected.dtype}, rtol {rtol:.3g}, "
                             f"atol {rtol * scale:.3g}: {exc}") from None


def bf16_values(bits):
    """The float32 values of bfloat16 bits (uint16), computed here, not by a kernel."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_bf16(a):
    """The bfloat16 bits nearest to float32 `a`, by the reference kernel (itself tested against
    ml_dtypes in test_bf16.py)."""
    a = np.asarray(a, np.float32)
    bits = np.empty(a.shape, np.uint16)
    ref.round_to_bf16(a, bits)
    return bits


def every_delicate_float32():
    """Every bfloat16 top half, each with the low halves just under, at and just over a tie."""
    tops = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (tops[:, None] | lows).ravel().view(np.float32)


def assert_loss_matches(actual, expected, dtype, what):
    """The mean loss, a Python float: rel 1e-6 for float32 (a mean of float32 row losses summed in
    different orders) or 1e-12 for float64, and as much absolute for a loss near 0."""
    assert type(actual) is float, f"{what} returned {type(actual).__name__}, not a Python float"
    tol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-12
    assert actual == pytest.approx(expected, rel=tol, abs=tol), what


# --- Running one kernel on both backends ------------------------------------------------------------

COVERED = set()  # the kernels that have an equivalence test: see test_backends.py, which checks that all have


def covers(*kernels):
    """Marks a test as the equivalence test of these kernels."""
    unknown = set(kernels) - set(backends.KERNELS)
    assert not unknown, f"not kernels: {unknown}"
    COVERED.update(kernels)
    return lambda test: test


def term_magnitudes(kernel, make_args):
    """For a kernel that is linear in each input (the dense layers, forward and backward): its outputs
    computed by the reference from the absolute values of the inputs. Each element is then the sum
    of the absolute values of the terms that the element sums, the scale its rounding error is
    relative to. (The ReLU's mask is unchanged: |out| > 0 where out > 0.)"""
    args = [np.abs(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in make_args()]
    getattr(ref, kernel)(*args)
    # strict=False: a call may leave trailing parameters at their defaults (out16=None ...)
    return dict(zip(inspect.signature(getattr(ref, kernel)).parameters, args, strict=False))


def check_kernel(backend, kernel, make_args, reductions, what="", linear=False, magnitudes=None):
    """Call `kernel` of numpy and of `backend`, each on its own make_args() (two calls, so two equal
    sets of arrays laid out alike), and compare the results.

    reductions maps the names of the arguments a kernel writes to the length of the sums behind
    them; every other array argument must come back exactly as numpy leaves it. For a `linear`
    kernel, the tolerances scale with term_magnitudes; for another, `magnitudes` may map argument
    names to the scale of their terms. Both backends must keep the return convention (see
    assert_returns). Returns the two results.
    """
    names = list(inspect.signature(getattr(ref, kernel)).parameters)
    expected_args, actual_args = make_args(), make_args()
    expected = getattr(ref, kernel)(*expected_args)
    actual = getattr(backends.get(backend), kernel)(*actual_args)
    label = f"{backend}.{kernel}{what}"
    if magnitudes is None:
        magnitudes = term_magnitudes(kernel, make_args) if linear else {}

    # strict=False: names has those of parameters left at their defaults too
    for name, got, want in zip(names, actual_args, expected_args, strict=False):
        if isinstance(want, np.ndarray):
            magnitude = magnitudes.get(name) if name in reductions else None
            assert_matches(got, want, reductions.get(name), f"{label}: argument {name}", magnitude)

    assert_returns(f"numpy.{kernel}{what}", kernel, expected)
    assert_returns(label, kernel, actual)
    assert type(actual) is type(expected), f"{label} returned {type(actual).__name__}, numpy {type(expected).__name__}"
    return actual, expected


# The kernels whose result is a number; every other kernel writes arrays and returns None.
NUMBER_KERNELS = {"softmax_cross_entropy", "softmax_cross_entropy_smoothed", "count_correct", "sum_of_squares"}
assert NUMBER_KERNELS <= set(backends.KERNELS)


def assert_returns(label, kernel, result):
    """The return convention of numpy_backend's docstring: a number kernel returns a Python float or
    int, and every other kernel None, so that no caller can read a result that is not in its outputs."""
    if kernel in NUMBER_KERNELS:
        assert type(result) in (float, int), f"{label} returned {type(result).__name__}, not a Python number"
    else:
        assert result is None, f"{label} returned {type(result).__name__}: a kernel that writes arrays returns None"


def laid_out(a, layout, axis=-1):
    """The values of `a` in a layout: "C" contiguous, "F" Fortran-ordered, or "strided": every other
    element along `axis` of a larger array whose other elements are NaN, so reading them shows."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    axis %= a.ndim
    shape = list(a.shape)
    shape[axis] *= 2
    big = np.full(shape, np.nan, a.dtype)
    view = big[(slice(None),) * axis + (slice(None, None, 2),)]
    view[...] = a
    return view


def garbage(shape, dtype):
    """A C-contiguous output buffer full of NaN, as a reused workspace would hold stale values: a
    kernel must overwrite, not accumulate into, its outputs."""
    return np.full(shape, np.nan, dtype)


DTYPES = ["float32", "float64"]
LAYOUTS = ["C", "F", "strided"]
dims = st.integers(1, 70)
seeds = st.integers(0, 2**32 - 1)
shapes = st.tuples(dims, dims, dims)  # (batch, fan_in, fan_out)
SETTINGS = settings(max_examples=30, deadline=None)
AWKWARD = [(1, 1, 1), (1, 70, 1), (70, 1, 70), (33, 17, 1)]  # batch 1, width 1, odd sizes


def with_awkward_shapes(**other_arguments):
    """Hypothesis examples that run every time: the AWKWARD shapes."""
    def decorate(test):
        for shape in AWKWARD:
            test = example(shape=shape, seed=0, **other_arguments)(test)
        return test
    return decorate


def dense_inputs(rng, shape, dtype, layout):
    """x (B, D), W (D, H), b (H,) and an upstream gradient dout (B, H) in `layout`; x and dout are
    strided along their rows, W and b along their columns."""
    batch, fan_in, fan_out = shape
    x = laid_out(rng.standard_normal((batch, fan_in)).astype(dtype), layout, axis=1)
    W = laid_out((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype), layout, axis=0)
    b = laid_out(rng.standard_normal(fan_out).astype(dtype), layout)
    dout = laid_out(rng.standard_normal((batch, fan_out)).astype(dtype), layout, axis=1)
    return x, W, b, dout


def activation_of(kernel):
    """The description (fastnet.activations) of the activation that `kernel` belongs to."""
    return next(a for a in ACTIVATIONS.values() if kernel in (a.forward, a.backward, a.dense_forward, a.dense_backward))


ELEMENTWISE_FORWARD = {a.forward: a.scalars for a in ACTIVATIONS.values()}  # kernel: scalars between x and out


def slope_error_scale(kernel, saved):
    """How much the last-bit differences between backends weigh in an activation's slope, per unit of
    upstream gradient: 1 for leaky ReLU (exact); 1 + out**2 for tanh, whose 1 - out**2 cancels; for
    GELU, whose tanh(.) may differ in its last bit between NumPy's and the C library's, the largest
    weight of that tanh in gelu'(z), 1 + |z| sqrt(2/pi) (1 + 3 * 0.044715 z**2)."""
    saved = np.asarray(saved, np.float64)
    if "leaky_relu" in kernel:
        return np.ones_like(saved)
    if "tanh" in kernel:
        return 1 + saved * saved
    return 1 + np.abs(saved) * ref.GELU_SQRT_2_OVER_PI * (1 + 3 * ref.GELU_CUBIC * saved * saved)


def activation_saved(kernel, z):
    """What the backward kernel of `kernel`'s activation reads for pre-activations z: the output of
    leaky ReLU or tanh, or z itself for GELU."""
    if "leaky_relu" in kernel:
        return np.where(z > 0, z, 0.01 * z)
    if "tanh" in kernel:
        return np.tanh(z)
    return z


# The dense ReLU kernels have tests of their own above, with dense_forward and dense_backward.
DENSE_ACTIVATION_FORWARD = tuple(a.dense_forward for a in ACTIVATIONS.values() if a.name != "relu")
DENSE_ACTIVATION_BACKWARD = tuple(a.dense_backward for a in ACTIVATIONS.values() if a.name != "relu")


def dense_activation_forward_args(kernel, x, W, b, dtype):
    """(x, W, b, *scalars, [pre,] out) for dense_forward or a dense_<activation>_forward kernel."""
    batch, fan_out = x.shape[0], W.shape[1]
    if kernel == "dense_forward":
        return x, W, b, garbage((batch, fan_out), dtype)
    act = activation_of(kernel)
    pre = (garbage((batch, fan_out), dtype),) if act.reads_input else ()
    return x, W, b, *act.scalars, *pre, garbage((batch, fan_out), dtype)


def dense_magnitudes(x, W, b):
    """The scale of the terms of x @ W + b (see term_magnitudes). The activations' slopes are at most
    1.13 (GELU's), so the outputs' rounding errors are of the same scale."""
    scale = np.abs(x) @ np.abs(W) + np.abs(b)
    return {"out": scale, "pre": scale}


def dense_activation_backward_magnitudes(kernel, dout, saved, x, W):
    """The scale of the terms of each result of dense_<activation>_backward: the scaled dout errs
    like slope_error_scale, and dW, db and dx sum it as dense_backward does."""
    scaled = np.abs(dout.astype(np.float64)) * slope_error_scale(kernel, saved)
    x, W = np.abs(x.astype(np.float64)), np.abs(W.astype(np.float64))
    return {"dout": scaled, "dW": x.T @ scaled, "db": scaled.sum(axis=0), "dx": scaled @ W.T}


# Shapes at which some of two threads get no tile, or tiles of unequal, unaligned sizes.
THREAD_SHAPES = [(1, 1, 1), (1, 70, 33), (2, 5, 10), (33, 17, 47), (129, 40, 31), (7, 3, 130)]


@contextlib.contextmanager
def tile_plan(backend, plan):
    """The numba backend cutting its work as `plan` says ('default', or 'finest': a tile per aligned
    block); other backends as they are."""
    if backend != "numba" or plan == "default":
        yield
        return
    from fastnet.backends import numba_gemm
    before = numba_gemm.plan()
    numba_gemm.set_plan(tile_flops=1, bf16_tile_flops=1, pass_elements=1)
    try:
        yield
    finally:
        numba_gemm.set_plan(**before)


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


# --- Small image trees of every file kind, and files made to hurt (test_folders, test_predict, test_reliability) ---

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


def declaring_png(path, width, height):
    """A PNG file of a few dozen bytes whose header declares width x height pixels: a 4 x 4 image with
    the size in its IHDR chunk rewritten and the chunk's CRC made to fit, as a decompression bomb's."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    assert raw[12:16] == b"IHDR"  # after the 8-byte signature, the first chunk: length, type, 13 bytes, CRC
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(raw[12:29]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def sparse_file(path, size, head=b""):
    """A file of `size` bytes that starts with `head` and takes no disk beyond it: the rest is a hole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(head)
        file.truncate(size)
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


def fastnet(*args, env=None, cwd=None, timeout=600, memory=None):
    """The command, run to its end: a CompletedProcess with stdout and stderr as text. `memory` caps
    its address space in bytes, so that a command that would take the machine's memory fails instead
    (as `timeout` makes one that would hang fail)."""
    command, options = _command(args, env)
    if memory is not None:
        options["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run(command, **options, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def start_fastnet(*args, env=None):
    """The command, started and not waited for: a Popen with stdout and stderr as text pipes, in a
    session of its own, so that os.killpg reaches it and its children as Ctrl-C in a terminal does. It
    gets SIGINT's default handling even if this process ignores it, as the jobs that a non-interactive
    shell puts in the background do: a suite started so must still see what Ctrl-C does."""
    command, options = _command(args, env)
    return subprocess.Popen(command, **options, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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


# --- Runs compared (test_reliability, test_storage_faults) ------------------------------------------

def run_outcome(run):
    """What must be bit-identical between runs: parameters, optimizer state, the weight average (--ema),
    and metrics but timings."""
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files
                  if name.startswith(("param_", "optim_", "ema_", "input_projection"))}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return arrays, [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in metrics]


def assert_same_outcome(run, reference):
    arrays, metrics = run_outcome(run)
    expected_arrays, expected_metrics = run_outcome(reference)
    assert arrays.keys() == expected_arrays.keys()
    for name in arrays:
        assert np.array_equal(arrays[name], expected_arrays[name]), f"{name} differs"
        assert arrays[name].dtype == expected_arrays[name].dtype
    assert metrics == expected_metrics
