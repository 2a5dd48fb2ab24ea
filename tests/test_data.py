"""Tests of fastnet.data: the three on-disk layouts, the checks on bad files, statistics and splitting.

Small synthetic data sets are written in every layout from the same arrays, so a layout that
converts pixels wrongly (e.g. forgets the planar-to-HWC transpose) cannot agree with the originals.
"""

import collections
import os
import pathlib
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet import data
from fastnet.data import (
    Dataset,
    channel_stats,
    default_data_path,
    find_dataset,
    load_dataset,
    split_validation,
    statistics,
)
from fastnet.errors import DataError, SettingError
from helpers import (
    CLASSES,
    make_arrays,
    real_data_path,
    unavailable,
    write_archive,
    write_batches,
    write_npy,
)


@pytest.fixture
def arrays():
    return make_arrays()


def build(layout, root, arrays):
    """Write ``arrays`` in ``layout`` under ``root``; return (path to pass, expected kind, names)."""
    if layout == "archive":
        return write_archive(root / "cifar-10-python.tar.gz", arrays), "archive", CLASSES
    if layout == "batches":
        return write_batches(root / "cifar-10-batches-py", arrays), "batches", CLASSES
    if layout == "npy":
        return write_npy(root / "npy", arrays), "npy", tuple(str(k) for k in range(10))
    _, kind, names = build(layout.removeprefix("parent-"), root / "parent", arrays)
    return root / "parent", kind, names


LAYOUTS = ["archive", "batches", "npy", "parent-archive", "parent-batches", "parent-npy"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_original_arrays(tmp_path, arrays, layout):
    path, kind, names = build(layout, tmp_path, arrays)
    assert find_dataset(path)[0] == kind
    ds = load_dataset(path)
    for key, expected in arrays.items():
        got = getattr(ds, key)
        assert got.dtype == (np.uint8 if "images" in key else np.int64), key
        assert got.flags.c_contiguous, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
    assert ds.class_names == names
    assert ds.warnings == ()
    assert ds.sample_shape == (32, 32, 3) and ds.input_size == 3072
    assert ds.channels == 3 and ds.num_classes == 10


def test_find_dataset_resolves_the_inner_path(tmp_path, arrays):
    write_batches(tmp_path / "cifar-10-batches-py", arrays)
    assert find_dataset(tmp_path) == ("batches", (tmp_path / "cifar-10-batches-py").resolve())


def test_folder_preference_is_npy_then_batches_then_archive(tmp_path, arrays):
    write_archive(tmp_path / "cifar-10-python.tar.gz", arrays)
    assert find_dataset(tmp_path)[0] == "archive"
    write_batches(tmp_path / "cifar-10-batches-py", arrays)
    assert find_dataset(tmp_path)[0] == "batches"
    write_npy(tmp_path / "npy", arrays)
    assert find_dataset(tmp_path) == ("npy", (tmp_path / "npy").resolve())


def test_archive_is_recognised_by_content_and_members_anywhere(tmp_path, arrays):
    path = write_archive(tmp_path / "oddly-named.bin", arrays, top="some/where/else")
    assert find_dataset(path)[0] == "archive"
    np.testing.assert_array_equal(load_dataset(path).train_images, arrays["train_images"])


def test_batches_without_meta_get_numbered_classes(tmp_path, arrays):
    path = write_batches(tmp_path / "b", arrays, names=None)
    assert load_dataset(path).class_names == tuple(str(k) for k in range(10))


def test_npy_class_names_file_is_used(tmp_path, arrays):
    path = write_npy(tmp_path / "n", arrays, names=CLASSES)
    assert load_dataset(path).class_names == CLASSES


def test_default_data_path_follows_environment(tmp_path, arrays, monkeypatch):
    monkeypatch.delenv("FASTNET_DATA", raising=False)
    assert default_data_path() == pathlib.Path("data")
    monkeypatch.setenv("FASTNET_DATA", "")
    assert default_data_path() == pathlib.Path("data")
    write_npy(tmp_path / "npy", arrays)
    monkeypatch.setenv("FASTNET_DATA", str(tmp_path))
    assert default_data_path() == tmp_path
    np.testing.assert_array_equal(load_dataset().test_labels, arrays["test_labels"])


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        find_dataset(tmp_path / "nowhere")
    message = _one_line(err)
    assert "does not exist" in message and str(tmp_path / "nowhere") in message and "--data" in message


def test_empty_folder_lists_what_was_looked_for(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    message = _one_line(err)
    for word in (str(tmp_path), "train_images.npy", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 "fastnet data download"):
        assert word in message


def test_plain_file_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        find_dataset(tmp_path / "notes.txt")
    assert "not a tar archive" in _one_line(err)


# ---- npy generality --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, channels", [((32, 32), 1), ((12,), 1), ((8, 8, 4), 4)])
def test_npy_accepts_other_sample_shapes(tmp_path, arrays, shape, channels):
    rng = np.random.default_rng(1)
    arrays["train_images"] = rng.integers(0, 256, (35, *shape), dtype=np.uint8)
    arrays["test_images"] = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
    ds = load_dataset(write_npy(tmp_path, arrays))
    assert ds.sample_shape == shape and ds.channels == channels
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npy_float_images_become_float32(tmp_path, arrays, dtype):
    for key in ("train_images", "test_images"):
        arrays[key] = (arrays[key] / 255.0).astype(dtype)
    ds = load_dataset(write_npy(tmp_path, arrays))
    assert ds.train_images.dtype == np.float32 and ds.test_images.dtype == np.float32
    assert ds.train_images.flags.c_contiguous
    np.testing.assert_allclose(ds.test_images, arrays["test_images"].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint64])
def test_npy_any_integer_labels_become_int64(tmp_path, arrays, dtype):
    arrays["train_labels"] = arrays["train_labels"].astype(dtype)
    ds = load_dataset(write_npy(tmp_path, arrays))
    assert ds.train_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])


def test_class_without_training_examples_is_a_warning(tmp_path, arrays):
    arrays["train_labels"][arrays["train_labels"] == 3] = 4
    ds = load_dataset(write_batches(tmp_path / "b", arrays))
    assert ds.warnings == ("class 'cat' (3) has no training examples",)
    assert ds.num_classes == 10


# ---- labels and classes ------------------------------------------------------------------------------
# Without class_names.txt the classes are 0 .. the largest label, and a label far past the others is
# almost always a typo; with the names, empty classes are meant, and reported in one line.

@pytest.mark.parametrize("split", ["train", "test"])
def test_a_label_far_past_the_others_is_one_error_naming_file_index_and_value(tmp_path, arrays, split):
    arrays[f"{split}_labels"][3] = 99
    folder = write_npy(tmp_path, arrays)
    with pytest.raises(DataError) as refused:
        load_dataset(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / f'{split}_labels.npy'}: label 99 at index 3 lies past 89 classes (10 to 98)")
    assert "fix the label" in message and str(folder / "class_names.txt") in message and "\n" not in message


def test_a_short_gap_in_the_classes_is_legal_and_reported(tmp_path, arrays):
    for split in ("train", "test"):  # class 3 is in neither split: 0 .. 9 with one class empty
        arrays[f"{split}_labels"][arrays[f"{split}_labels"] == 3] = 4
    ds = load_dataset(write_npy(tmp_path, arrays))
    assert ds.num_classes == 10 and ds.warnings == ("class '3' (3) has no training examples",)


def test_many_empty_classes_that_are_named_make_one_warning_line(tmp_path, arrays):
    arrays["train_labels"][3] = 99
    ds = load_dataset(write_npy(tmp_path, arrays, names=[f"c{k}" for k in range(100)]))
    assert ds.num_classes == 100
    assert ds.warnings == (("89 classes have no training examples: 'c10' (10), 'c11' (11), 'c12' (12), 'c13' (13), "
                            "'c14' (14) and 84 more"),)


def test_a_label_past_the_named_classes_is_one_error(tmp_path, arrays):
    arrays["test_labels"][2] = 10
    folder = write_npy(tmp_path, arrays, names=[f"c{k}" for k in range(10)])
    with pytest.raises(DataError, match=r"test_labels.npy: label 10 at index 2 is past the 10 classes that .*"
                                        r"class_names.txt names: fix the label, or add its class to the list"):
        load_dataset(folder)


# ---- bad inputs ------------------------------------------------------------------------------------

def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def bad_truncated_archive(root, a):
    path = write_archive(root / "cifar-10-python.tar.gz", a)
    _truncate(path)
    return path


def bad_truncated_batch(root, a):
    path = write_batches(root / "b", a)
    _truncate(path / "data_batch_3")
    return path


def bad_garbage_batch(root, a):
    path = write_batches(root / "b", a)
    (path / "data_batch_2").write_bytes(np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def bad_batch_is_a_list(root, a):
    path = write_batches(root / "b", a)
    (path / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    return path


def bad_batch_without_data(root, a):
    path = write_batches(root / "b", a)
    (path / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}))
    return path


def bad_batch_with_foreign_global(root, a):
    # Stock pickle would happily build this; the loader must refuse globals a batch never contains.
    path = write_batches(root / "b", a)
    (path / "test_batch").write_bytes(pickle.dumps({b"data": collections.OrderedDict(), b"labels": []}))
    return path


def bad_batch_float_data(root, a):
    path = write_batches(root / "b", a)
    batch = {b"data": np.zeros((5, 3072)), b"labels": [0] * 5}
    (path / "test_batch").write_bytes(pickle.dumps(batch))
    return path


def bad_batch_wrong_width(root, a):
    path = write_batches(root / "b", a)
    batch = {b"data": np.zeros((7, 3000), np.uint8), b"labels": [0] * 7}
    (path / "data_batch_4").write_bytes(pickle.dumps(batch))
    return path


def bad_batch_missing_file(root, a):
    path = write_batches(root / "b", a)
    (path / "data_batch_5").unlink()
    return path


def bad_batch_counts(root, a):
    a["train_labels"] = a["train_labels"].copy()
    path = write_batches(root / "b", a)
    batch = pickle.loads((path / "data_batch_1").read_bytes(), encoding="bytes")
    batch[b"labels"] = batch[b"labels"][:-1]
    (path / "data_batch_1").write_bytes(pickle.dumps(batch))
    return path


def bad_batch_counts_that_cancel(root, a):
    # One label moved from batch 1 to batch 2: the totals agree, the pairing of images and labels does not.
    path = write_batches(root / "b", a)
    first, second = (pickle.loads((path / n).read_bytes(), encoding="bytes") for n in ("data_batch_1", "data_batch_2"))
    second[b"labels"].append(first[b"labels"].pop())
    for name, batch in (("data_batch_1", first), ("data_batch_2", second)):
        (path / name).write_bytes(pickle.dumps(batch))
    return path


def bad_batch_scalar_labels(root, a):
    path = write_batches(root / "b", a)
    (path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((5, 3072), np.uint8), b"labels": 3}))
    return path


def bad_meta(root, a):
    path = write_batches(root / "b", a)
    (path / "batches.meta").write_bytes(pickle.dumps({b"other": 1}))
    return path


def bad_label_beyond_class_names(root, a):
    a["test_labels"][0] = 10
    return write_batches(root / "b", a)


def bad_npy_truncated(root, a):
    path = write_npy(root / "n", a)
    _truncate(path / "train_images.npy")
    return path


def _npy_with(**changes):
    def builder(root, a):
        for key, change in changes.items():
            a[key] = change(a[key])
        return write_npy(root / "n", a)
    return builder


def bad_npy_names_too_few(root, a):
    return write_npy(root / "n", a, names=CLASSES[:5])


def _negative(labels):
    labels = labels.copy()
    labels[2] = -1
    return labels


def _with_nan(images):
    images = images / 255.0
    images[0, 1, 2, 0] = np.nan
    return images


BAD_INPUTS = [
    (bad_truncated_archive, "cifar-10-python.tar.gz"),
    (bad_truncated_batch, "data_batch_3"),
    (bad_garbage_batch, "data_batch_2"),
    (bad_batch_is_a_list, "test_batch"),
    (bad_batch_without_data, "test_batch"),
    (bad_batch_with_foreign_global, "test_batch"),
    (bad_batch_float_data, "uint8"),
    (bad_batch_wrong_width, "different image widths"),
    (bad_batch_missing_file, "data_batch_5"),
    (bad_batch_counts, "7 images but 6 labels"),
    (bad_batch_counts_that_cancel, "data_batch_1"),
    (bad_batch_scalar_labels, "must be integers in a 1-D array"),
    (bad_meta, "batches.meta"),
    (bad_label_beyond_class_names, "label 10"),
    (bad_npy_truncated, "train_images.npy"),
    (bad_npy_names_too_few, "past the 5 classes"),
    (_npy_with(train_labels=lambda x: x[:-1]), "35 images but 34 labels"),
    (_npy_with(test_images=lambda x: x[:, :16, :16]), "same sample shape"),
    (_npy_with(train_images=lambda x: x / 100.0), "not [0, 1]"),
    (_npy_with(test_images=lambda x: x / 255.0 - 0.5), "not [0, 1]"),
    (_npy_with(train_images=_with_nan), "NaN"),
    (_npy_with(test_images=lambda x: np.full(x.shape, np.inf)), "NaN or infinite"),
    (_npy_with(train_images=lambda x: x.astype(np.int16)), "int16"),
    (_npy_with(train_images=lambda x: x.reshape(-1)), "shape"),
    (_npy_with(train_labels=_negative), "negative"),
    (_npy_with(test_labels=lambda x: x.astype(np.float64)), "must be integers"),
    (_npy_with(train_labels=lambda x: x.astype(bool)), "must be integers"),
    (_npy_with(test_images=lambda x: x[:0], test_labels=lambda x: x[:0]), "no images"),
]


@pytest.mark.parametrize("builder, words", BAD_INPUTS,
                         ids=[b.__name__ if b.__name__ != "builder" else f"npy-{i}"
                              for i, (b, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_one_line_data_error(tmp_path, arrays, builder, words):
    path = builder(tmp_path, arrays)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    message = _one_line(err)
    assert words in message
    assert str(path.resolve()) in message or str(path) in message


# ---- channel_stats ---------------------------------------------------------------------------------

def _direct_stats(images):
    x = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
    x = x.reshape(-1, images.shape[-1]) if images.ndim == 4 else x.reshape(-1, 1)
    return x.mean(axis=0), np.maximum(x.std(axis=0), 1e-3)


@pytest.mark.parametrize("shape", [(50, 6, 6, 3), (50, 5, 5), (50, 17), (50, 4, 4, 1)])
@pytest.mark.parametrize("chunk", [None, 1, 7, 50, 1000])
def test_channel_stats_matches_direct_computation(shape, chunk):
    images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    mean, std = channel_stats(images, chunk=chunk)
    expected_mean, expected_std = _direct_stats(images)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    assert mean.shape == std.shape == (shape[-1] if len(shape) == 4 else 1,)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
    np.testing.assert_allclose(std, expected_std, atol=1e-6)


class _SliceRecorder(np.ndarray):
    """An array that remembers the length of every slice taken from it."""

    def __getitem__(self, key):
        part = super().__getitem__(key)
        if isinstance(key, slice):
            self.info.append(len(part))
        return part


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])  # summed in float64; counted
def test_channel_stats_uses_module_chunk_size(monkeypatch, dtype):
    images = (np.random.default_rng(3).random((40, 4, 4, 2), dtype=np.float32) * 255).astype(dtype)
    recorder = images.view(_SliceRecorder)
    recorder.info = []
    monkeypatch.setattr(statistics, "STATS_CHUNK", 6)
    mean, std = channel_stats(recorder)
    expected = _direct_stats(images)
    np.testing.assert_allclose(mean, expected[0], atol=1e-6)
    np.testing.assert_allclose(std, expected[1], atol=1e-6)
    # Never more than one chunk converted at a time, and every image seen exactly once.
    assert recorder.info == [6, 6, 6, 6, 6, 6, 4]


@pytest.mark.parametrize("shape", [(300, 8, 8, 3), (77, 5, 5), (40, 3, 3, 4), (9, 2, 2, 1)])
def test_channel_stats_of_uint8_images_are_the_exact_moments_rounded_once(shape):
    from fractions import Fraction
    rng = np.random.default_rng(sum(shape))
    # Values bunched near 255 as well as spread: sums of squares large and variances small.
    images = np.clip(rng.normal(rng.uniform(0, 255), rng.uniform(0.5, 90), shape), 0, 255).astype(np.uint8)
    values = images.reshape(-1, shape[-1] if len(shape) == 4 else 1).astype(np.int64)
    mean, std = channel_stats(images, chunk=13)
    for channel, column in enumerate(values.T):
        n, total, squares = len(column), int(column.sum()), int((column * column).sum())
        exact_variance = Fraction(n * squares - total * total, (255 * n) ** 2)
        assert mean[channel] == np.float32(float(Fraction(total, 255 * n)))
        assert std[channel] == np.float32(max(np.sqrt(float(exact_variance)), 1e-3))


def test_channel_stats_floors_constant_channels():
    images = np.full((10, 2, 2, 3), 7, np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, 7 / 255, atol=1e-7)
    np.testing.assert_array_equal(std, np.float32(1e-3))


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_feature_stats_standardise_each_column_by_its_own_spread(chunk):
    rng = np.random.default_rng(4)
    columns = np.column_stack([rng.normal(3e5, 2e3, 60), rng.normal(0, 1e-6, 60), np.full(60, 0.1),
                               np.zeros(60), rng.integers(0, 9, 60)])
    mean, std = data.feature_stats(columns.astype(np.float32), chunk=chunk)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (5,)
    np.testing.assert_allclose(mean, columns.astype(np.float32).astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(std[[0, 1, 4]], columns[:, [0, 1, 4]].std(axis=0), rtol=1e-4)
    np.testing.assert_array_equal(std[[2, 3]], np.float32(1.0))  # constant: one unit, so centred and not blown up
    pixels = rng.integers(0, 256, (30, 4), dtype=np.uint8)
    mean, std = data.feature_stats(pixels)  # uint8 in [0, 1], as channel_stats and normalizer have it
    np.testing.assert_allclose(mean, pixels.mean(axis=0) / 255, rtol=1e-6)
    with pytest.raises(DataError):
        data.feature_stats(np.zeros((0, 3), np.float32))


def test_channel_stats_of_nothing_is_a_data_error():
    with pytest.raises(DataError):
        channel_stats(np.zeros((0, 4, 4, 3), np.uint8))


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 30), chunk=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_channel_stats_does_not_depend_on_chunking(count, chunk, seed):
    images = np.random.default_rng(seed).integers(0, 256, (count, 3, 3, 2), dtype=np.uint8)
    whole = channel_stats(images, chunk=count)
    chunked = channel_stats(images, chunk=chunk)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-6)


# ---- split_validation ------------------------------------------------------------------------------

def test_split_validation_partitions_the_samples():
    ids = np.arange(100, dtype=np.int64)
    labels = ids % 4
    images = np.repeat(ids[:, None], 3, axis=1).astype(np.uint8)  # image i holds value i
    tr_x, tr_y, va_x, va_y = split_validation(images, labels, 20, np.random.default_rng(0))
    assert len(tr_x) == len(tr_y) == 80 and len(va_x) == len(va_y) == 20
    train_ids, val_ids = tr_x[:, 0].astype(int), va_x[:, 2].astype(int)
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(100))
    assert (np.diff(train_ids) > 0).all() and (np.diff(val_ids) > 0).all()  # original order kept
    np.testing.assert_array_equal(tr_y, labels[train_ids])  # labels travel with their images
    np.testing.assert_array_equal(va_y, labels[val_ids])
    assert all(a.flags.c_contiguous for a in (tr_x, tr_y, va_x, va_y))
    tr_x[:] = 0
    assert images.any()  # a copy, not a view


def test_split_validation_follows_the_generator():
    ids = np.arange(1000)
    labels = ids % 7
    first = split_validation(ids, labels, 100, np.random.default_rng(7))[2]
    again = split_validation(ids, labels, 100, np.random.default_rng(7))[2]
    other = split_validation(ids, labels, 100, np.random.default_rng(8))[2]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_split_validation_holds_out_each_class_in_proportion_to_its_size():
    """Shares 60, 30, 9.9 and 0.1 of 100: rounded down to 60, 30, 9 and 0, and the one left goes to the
    class that rounding cost most. A random split would be 60 +- 5, 30 +- 4, 10 +- 3, 0 or 1."""
    labels = np.repeat([2, 0, 3, 1], [600, 300, 99, 1])  # classes in no particular order of size
    for seed in range(5):
        _, train_labels, _, val_labels = split_validation(labels, labels, 100, np.random.default_rng(seed))
        assert {c: int(np.sum(val_labels == c)) for c in range(4)} == {2: 60, 0: 30, 3: 10, 1: 0}
        assert np.bincount(train_labels).tolist() == [270, 1, 540, 89]


def test_split_validation_draws_which_of_equal_classes_gets_the_sample_that_rounding_leaves():
    labels = np.repeat([0, 1, 2], 5)
    chosen = {int(split_validation(labels, labels, 1, np.random.default_rng(seed))[3][0]) for seed in range(20)}
    assert chosen == {0, 1, 2}  # not always the first class


def test_split_validation_never_takes_a_class_s_last_sample():
    """Shares of 99 out of 103: 0.96 for each class of one, 96.1 for the class of 100. Each class of
    one has the largest remainder, yet keeps its sample: the big class gives all 99."""
    labels = np.repeat([0, 1, 2, 3], [1, 1, 1, 100])
    for seed in range(5):
        _, train_labels, _, val_labels = split_validation(labels, labels, 99, np.random.default_rng(seed))
        assert np.bincount(train_labels).tolist() == [1, 1, 1, 1] and np.bincount(val_labels).tolist() == [0, 0, 0, 99]
    with pytest.raises(DataError) as err:
        split_validation(np.arange(5), np.arange(5), 1, np.random.default_rng(0))
    assert _one_line(err).endswith("each of the 5 classes of the training set has one sample, which it keeps to be "
                                   "trained on; pass --val 0")


@pytest.mark.parametrize("count", [0, -1, 9, 11, 2.5])
def test_split_validation_rejects_bad_counts(count):
    labels = np.arange(10) % 2  # two classes, each of which keeps one sample
    with pytest.raises(DataError) as err:
        split_validation(labels, labels, count, np.random.default_rng(0))
    assert f"--val {count} must be between 1 and 8: the training set has 10 samples in 2 classes" in _one_line(err)


def test_dataset_properties_for_flat_samples():
    x = np.zeros((4, 6), np.uint8)
    y = np.zeros(4, np.int64)
    ds = Dataset(x, y, x, y, ("a", "b"), "test")
    assert (ds.sample_shape, ds.input_size, ds.num_classes, ds.channels, ds.warnings) == ((6,), 6, 2, 1, ())


# ---- the real CIFAR-10 -----------------------------------------------------------------------------

def _real_layouts():
    """The layouts of the real data (conftest.real_data_path): its batches and npy subfolders, or the folder itself."""
    root = real_data_path()
    found = {name: root / name for name in ("cifar-10-batches-py", "npy") if (root / name).is_dir()}
    return found or {"data": root}


@pytest.fixture(scope="module")
def real_datasets():
    return {name: (find_dataset(path)[0], load_dataset(path)) for name, path in _real_layouts().items()}


@pytest.mark.cifar
def test_real_cifar10_is_the_published_set(real_datasets):
    for kind, ds in real_datasets.values():
        assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
        assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
        assert np.bincount(ds.train_labels).tolist() == [5000] * 10
        assert np.bincount(ds.test_labels).tolist() == [1000] * 10
        assert abs(float(ds.train_images.mean()) - 120.7) < 1.0
        assert ds.warnings == ()
        # Only the python layouts carry names; a bare npy folder has them only with class_names.txt.
        named = kind != "npy" or "class_names.txt" in os.listdir(ds.source.removeprefix("npy files in "))
        assert ds.class_names == (CLASSES if named else tuple(str(k) for k in range(10)))


@pytest.mark.cifar
def test_real_cifar10_layouts_load_identically(real_datasets):
    if len(real_datasets) < 2:
        unavailable("FASTNET_TEST_DATA holds one layout: build both batches and npy to compare (see .ci/run)")
    (_, first), *others = real_datasets.values()
    for _, other in others:
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(getattr(first, key), getattr(other, key), err_msg=key)


# --- Principal components (fastnet train --pca) --------------------------------------------------------

def low_rank_images(seed=0, count=400):
    """(count, 4, 4, 3) uint8 images that vary mostly along three directions, with distinct strengths,
    plus a little noise: their leading principal components are well defined."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((3, 48))
    strengths = rng.standard_normal((count, 3)) * np.array([40.0, 25.0, 12.0])
    pixels = 128 + strengths @ directions + rng.normal(0, 2, (count, 48))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(count, 4, 4, 3)


def standardisation(images):
    shift = np.full(48, 120.0, np.float32)
    scale = np.linspace(0.01, 0.03, 48).astype(np.float32)  # unequal, so it matters that it is applied
    return shift, scale


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_principal_components_are_the_top_singular_vectors_of_the_standardised_images(backend):
    from fastnet import backends

    images = low_rank_images()
    shift, scale = standardisation(images)
    components = data.principal_components(images, shift, scale, 5, np.random.default_rng(0),
                                           backends.get(backend), sample=len(images))
    assert components.shape == (48, 5) and components.dtype == np.float32
    # The independent reference: an SVD, in float64, of the centred standardised images.
    standardised = (images.reshape(len(images), -1) - shift.astype(np.float64)) * scale
    _, _, rows = np.linalg.svd(standardised - standardised.mean(axis=0), full_matrices=False)
    overlap = components.T.astype(np.float64) @ rows[:5].T  # +-1 on the diagonal, 0 elsewhere
    np.testing.assert_allclose(np.abs(overlap), np.eye(5), atol=2e-4)
    np.testing.assert_allclose(components.T @ components, np.eye(5), atol=1e-5)
    # Each column's largest entry is positive, whichever sign LAPACK returned.
    assert (components[np.abs(components).argmax(axis=0), np.arange(5)] > 0).all()


def test_principal_components_of_a_sample_are_drawn_from_the_generator():
    from fastnet import backends

    images = low_rank_images(count=300)
    shift, scale = standardisation(images)
    kernels = backends.get("numpy")

    def fit(seed):
        return data.principal_components(images, shift, scale, 3, np.random.default_rng(seed), kernels, sample=100)

    assert np.array_equal(fit(1), fit(1))
    assert not np.array_equal(fit(1), fit(2))
    # Any sample finds the space of the three strong directions the data was made of (its axes within
    # that space turn with the sample): the cosines of the angles between two samples' spaces are ~1.
    np.testing.assert_allclose(np.linalg.svd(fit(1).T @ fit(2), compute_uv=False), 1, atol=1e-3)
    with pytest.raises(SettingError, match="pca 101 asks for more components than 100 images of 48 inputs can give: "
                                           "pass at most 48"):
        data.principal_components(images, shift, scale, 101, np.random.default_rng(0), kernels, sample=100)
    with pytest.raises(SettingError, match=r"pca 41 asks for more components than 40 images \(a sample of the 300 "
                                           r"training images\) of 48 inputs can give: pass at most 40$"):
        data.principal_components(images, shift, scale, 41, np.random.default_rng(0), kernels, sample=40)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_project_standardises_then_multiplies_chunk_by_chunk(backend, dtype, rtol):
    from fastnet import backends

    images = low_rank_images(count=23)  # 23 rows in chunks of 5: a short last chunk
    shift, scale = (a.astype(dtype) for a in standardisation(images))
    projection = np.random.default_rng(1).standard_normal((48, 7)).astype(dtype)
    projected = data.project(images, shift, scale, projection, backends.get(backend), chunk=5)
    expected = ((images.reshape(23, -1) - shift.astype(np.float64)) * scale) @ projection
    # float32: each of the 7 outputs sums 48 products of inputs near 1, so errors scale with sqrt(48).
    assert projected.dtype == np.dtype(dtype) and projected.shape == (23, 7)
    np.testing.assert_allclose(projected, expected, rtol=rtol, atol=rtol * np.sqrt(48) * np.abs(expected).max())


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("shape", [(4, 4, 3), (3, 5, 2), (4, 5)], ids=["even", "odd-width", "one-channel"])
def test_mirrored_components_turn_a_flip_of_the_image_into_a_change_of_signs(backend, shape):
    from fastnet import backends

    rng = np.random.default_rng(3)
    features = int(np.prod(shape))
    directions = rng.standard_normal((3, features))
    strengths = rng.standard_normal((300, 3)) * [40.0, 25.0, 12.0]
    pixels = 128 + strengths @ directions + rng.normal(0, 2, (300, features))
    images = np.clip(pixels, 0, 255).astype(np.uint8).reshape(300, *shape)
    channels = shape[2] if len(shape) == 3 else 1
    # Per-channel statistics, as the trainer's normalizer makes: the same for a pixel and its mirror.
    shift = np.tile(rng.uniform(100, 140, channels), features // channels).astype(np.float32)
    scale = np.tile(rng.uniform(0.01, 0.03, channels), features // channels).astype(np.float32)
    kernels = backends.get(backend)
    components = data.principal_components(images, shift, scale, 6, rng, kernels, sample=300, mirrored=shape)
    signs = data.mirror_signs(components, shape)
    assert set(signs) <= {-1.0, 1.0} and signs.dtype == np.float32
    np.testing.assert_allclose(components.T @ components, np.eye(6), atol=1e-5)

    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    projected, of_mirrored = (data.project(x, shift, scale, components, kernels) for x in (images, mirrored))
    np.testing.assert_allclose(of_mirrored, projected * signs, atol=1e-4 * np.abs(projected).max())
    # The independent reference: an SVD of the images and their mirror images together. The three
    # directions and their mirrors make six, which the six components span.
    both = np.concatenate([images, mirrored]).reshape(600, -1).astype(np.float64)
    standardised = (both - shift) * scale
    _, _, rows = np.linalg.svd(standardised - standardised.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.linalg.svd(components.T @ rows[:6].T, compute_uv=False), 1, atol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("mirrored", [None, (4, 4, 3)], ids=["plain", "mirrored"])
def test_whitened_components_scale_each_direction_to_unit_variance_above_the_floor(backend, mirrored):
    from fastnet import backends
    from fastnet.data.components import WHITEN_FLOOR

    images = low_rank_images()
    shift, scale = standardisation(images)
    plain, white = (data.principal_components(images, shift, scale, 5, np.random.default_rng(0), backends.get(backend),
                                              sample=len(images), mirrored=mirrored, whiten=whiten)
                    for whiten in (False, True))
    lengths = np.linalg.norm(white.astype(np.float64), axis=0)
    np.testing.assert_allclose(white / lengths, plain, atol=1e-5)  # the same directions, only rescaled
    # The independent reference, in float64: the variance of the standardised images (with their mirror
    # images, when fitted so) along each direction, and the mean variance of a pixel.
    standardised = (images.reshape(len(images), -1) - shift.astype(np.float64)) * scale
    if mirrored is not None:
        standardised = np.concatenate([standardised, standardised.reshape(-1, 4, 4, 3)[:, :, ::-1].reshape(-1, 48)])
    centred = standardised - standardised.mean(axis=0)
    variances = np.mean((centred @ plain.astype(np.float64)) ** 2, axis=0)
    floor = WHITEN_FLOOR * np.mean(centred ** 2, axis=0).mean()
    np.testing.assert_allclose(lengths, 1 / np.sqrt(variances + floor), rtol=1e-4)
    # So the projected images have variance v / (v + floor) along a direction of variance v: close to 1
    # for the strong directions, while the floor keeps the faint ones from being blown up to 1.
    projected = np.mean((centred @ white.astype(np.float64)) ** 2, axis=0)
    np.testing.assert_allclose(projected, variances / (variances + floor), rtol=1e-4)
    assert projected[0] > 0.9 and projected[-1] < 0.7
    if mirrored is not None:
        assert np.array_equal(data.mirror_signs(white, mirrored), data.mirror_signs(plain, mirrored))


@pytest.mark.parametrize("shape", [(4, 4, 3), (3, 5, 2), (4, 5)], ids=["even", "odd-width", "one-channel"])
def test_mirror_images_flips_each_flattened_image_left_to_right(shape):
    images = np.random.default_rng(0).integers(0, 256, (3, *shape), dtype=np.uint8)
    mirrored = data.mirror_images(images.reshape(3, -1), shape)
    assert mirrored.shape == (3, images[0].size) and mirrored.dtype == np.uint8
    assert np.array_equal(mirrored, images[:, :, ::-1].reshape(3, -1))
    assert mirrored.flags.c_contiguous  # else every kernel that reads it copies all of it first


def test_mirror_signs_refuse_components_that_a_flip_mixes():
    from fastnet import backends

    images = low_rank_images()
    shift, scale = standardisation(images)
    plain = data.principal_components(images, shift, scale, 4, np.random.default_rng(0), backends.get("numpy"))
    with pytest.raises(ValueError, match="not mirror-symmetric or antisymmetric"):
        data.mirror_signs(plain, (4, 4, 3))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_component_flip_negates_the_antisymmetric_components_of_the_images_it_draws(backend):
    from fastnet import backends

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((30, 7)).astype(np.float32)
    signs = np.array([1, -1, 1, 1, -1, -1, 1], np.float32)
    indices = rng.permutation(30)[:17]
    out = np.full((17, 7), np.nan, np.float32)
    data.ComponentFlip(signs).apply(backends.get(backend), inputs, indices, np.random.default_rng(5), None, None, out)
    # The flips are the ones Augmentation(flip=True) draws from the same generator.
    flips = data.Augmentation((1, 1), flip=True).draw(np.random.default_rng(5), 17)[0]
    assert 0 < flips.sum() < 17
    np.testing.assert_array_equal(out, inputs[indices] * np.where(flips[:, None] != 0, signs, 1))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_projected_augmentation_augments_the_pixels_then_projects_them(backend):
    from fastnet import backends

    kernels = backends.get(backend)
    images = low_rank_images(count=40)
    shift, scale = standardisation(images)
    projection = np.random.default_rng(2).standard_normal((48, 5)).astype(np.float32)
    augmentation = data.Augmentation((4, 4, 3), flip=True, translate=1, cutout=2)
    indices = np.arange(3, 20)
    out = np.full((17, 5), np.nan, np.float32)
    data.ProjectedAugmentation(augmentation, projection).apply(kernels, images, indices, np.random.default_rng(7),
                                                               shift, scale, out)
    pixels = np.empty((17, 48), np.float32)  # the same draws, from the same generator state
    augmentation.apply(kernels, images, indices, np.random.default_rng(7), shift, scale, pixels)
    np.testing.assert_allclose(out, pixels.astype(np.float64) @ projection, rtol=1e-5,
                               atol=1e-5 * np.abs(pixels).max() * np.sqrt(48))


def test_a_test_without_the_real_images_says_where_it_looked(monkeypatch, tmp_path):
    import re

    import helpers
    monkeypatch.delenv("CI", raising=False)  # under CI the same reasons fail the test instead
    monkeypatch.delenv("FASTNET_TEST_DATA", raising=False)
    monkeypatch.setattr(helpers, "ROOT", tmp_path)
    looked = re.escape(str(tmp_path / "data"))
    with pytest.raises(pytest.skip.Exception, match=f"no CIFAR-10 in {looked} and FASTNET_TEST_DATA is not set"):
        helpers.real_data_path()
    monkeypatch.setenv("FASTNET_TEST_DATA", str(tmp_path / "built"))
    with pytest.raises(pytest.skip.Exception, match=r"FASTNET_TEST_DATA=.*built holds no CIFAR-10: point it at"):
        helpers.real_data_path()
