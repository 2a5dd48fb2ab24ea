"""Image trees (fastnet.data.folders): train/<class>/ and test/<class>/ of image files, as users keep them.

Small odd trees are built with Pillow: mixed modes (RGB, L, P with a transparent index, RGBA), mixed
case of extensions, junk files; the loaded arrays are compared pixel for pixel with what Pillow
decodes from each file. The real-data test compares the unzipped CIFAR-10 JPEG tree with the
batches build.py makes from the same zip.
"""

import concurrent.futures
import json
import os
import pathlib
import signal

import numpy as np
import pytest
from PIL import Image

from fastnet import data
from fastnet.data import folders
from fastnet.errors import DataError, FastnetError, SettingError
from helpers import JUNK, SIZE, fastnet, make_tree, real_data_path, save_image, unavailable


def pillow_pixels(path):
    """What the file holds, by Pillow directly: RGB, transparent pixels on white."""
    with Image.open(path) as picture:
        if "A" in picture.mode or "transparency" in picture.info:
            rgba = picture.convert("RGBA")
            picture = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(picture.convert("RGB"))


def expected(root, split):
    classes = sorted(p.name for p in (root / "train").iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            if path.name not in JUNK:
                images.append(pillow_pixels(path))
                labels.append(label)
    return classes, np.stack(images), np.array(labels)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FASTNET_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tree_loads_to_what_pillow_decodes_with_labels_from_the_sorted_folder_names(tmp_path, cache, workers,
                                                                                      monkeypatch):
    monkeypatch.setattr(folders, "CHUNK", 4)  # several chunks, so that 2 workers make a pool
    root = make_tree(tmp_path / "pets", np.random.default_rng(0))
    dataset = data.load_image_tree(root, workers=workers)
    classes, train_images, train_labels = expected(root, "train")
    _, test_images, test_labels = expected(root, "test")
    assert dataset.class_names == tuple(classes) == ("Moth", "ant", "zebra")
    np.testing.assert_array_equal(dataset.train_images, train_images)
    np.testing.assert_array_equal(dataset.train_labels, train_labels)
    np.testing.assert_array_equal(dataset.test_images, test_images)
    np.testing.assert_array_equal(dataset.test_labels, test_labels)
    assert dataset.train_images.dtype == np.uint8 and dataset.sample_shape == (*SIZE, 3)
    assert dataset.warnings == ((f"skipped 3 files in {root} that are not an image by name or not in a class folder: "
                                 "train/zebra/.DS_Store, train/zebra/Thumbs.db, train/zebra/notes.txt"),)


def test_load_dataset_and_find_dataset_recognise_a_tree(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(1))
    assert data.find_dataset(root) == ("images", root.resolve())
    assert data.load_dataset(root).source == f"image tree {root.resolve()}"


def test_links_to_folders_are_followed_once_and_a_loop_is_named(tmp_path, cache):
    """A class folder's subfolders are read, through a symbolic link too; a link that would loop, or
    read a folder a second time, is not followed and is named in one warning line."""
    root = make_tree(tmp_path / "pets", np.random.default_rng(4), classes=("ant", "bee"))
    extra = save_image(tmp_path / "elsewhere" / "deep" / "x.png", "RGB", np.random.default_rng(5)).parent.parent
    os.symlink(extra, root / "train" / "ant" / "more")  # outside the tree: followed
    os.symlink(root / "train", root / "train" / "bee" / "up")  # an ancestor: would loop
    os.symlink(root / "train" / "ant", root / "train" / "bee" / "again")  # ant/ once more: would read it twice
    dataset = data.load_image_tree(root, workers=1)
    plain = make_tree(tmp_path / "plain", np.random.default_rng(4), classes=("ant", "bee"))
    reference = data.load_image_tree(plain, workers=1)
    assert len(dataset.train_images) == len(reference.train_images) + 1  # x.png, once
    np.testing.assert_array_equal(dataset.train_images[len(reference.train_images) // 2], pillow_pixels(
        extra / "deep" / "x.png"))  # sorted after ant/008.GIF: the first of ant's paths under "more/"
    assert dataset.warnings[-1] == (f"did not follow 2 symbolic links to folders in {root.resolve()} that would "
                                    "loop or read a folder twice (each image is read once): train/bee/again, "
                                    "train/bee/up")


DECODE_FILES = folders.decode_files


def count_decodes(monkeypatch):
    calls = []

    def counted(root, files, reference):
        calls.append(len(files))
        return DECODE_FILES(root, files, reference)
    monkeypatch.setattr(folders, "decode_files", counted)
    return calls


def test_the_second_load_reads_the_cache_and_a_changed_file_is_decoded_again(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "pets", np.random.default_rng(2))
    first = data.load_image_tree(root, workers=1)
    assert sorted(p.suffix for p in (cache / "images").iterdir()) == [".npy", ".npy"]  # train and test, no leftovers

    def fail(*args):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(folders, "decode_files", fail)
    again = data.load_image_tree(root, workers=1)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    np.testing.assert_array_equal(again.test_images, first.test_images)

    calls = count_decodes(monkeypatch)
    touched = root / "train" / "ant" / "000.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    data.load_image_tree(root, workers=1)
    assert calls == [27]  # the training split again, not the unchanged test split

    calls.clear()
    save_image(touched, "RGB", np.random.default_rng(99))  # new pixels; the size in bytes changes too
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    changed = data.load_image_tree(root, workers=1)
    assert calls == [27]
    np.testing.assert_array_equal(changed.train_images[9], pillow_pixels(touched))

    calls.clear()
    save_image(root / "test" / "ant" / "new.png", "RGB", np.random.default_rng(3))
    (root / "test" / "zebra" / "000.png").unlink()
    data.load_image_tree(root, workers=1)
    assert calls == [12]


def test_the_same_listing_in_another_order_of_events_gives_the_same_key():
    files = [("train/a/1.png", 10, 5), ("train/b/2.png", 11, 6)]
    assert folders.cache_key(files) == folders.cache_key(list(files))
    assert folders.cache_key(files) != folders.cache_key([files[0], ("train/b/2.png", 12, 6)])
    assert folders.cache_key(files) != folders.cache_key([files[0], ("train/b/2.png", 11, 7)])
    assert folders.cache_key(files) != folders.cache_key(files[:1])


@pytest.mark.parametrize("damage", ["truncated", "a header declaring a petabyte"])
def test_a_damaged_cache_file_is_decoded_again(tmp_path, cache, monkeypatch, damage):
    root = make_tree(tmp_path / "pets", np.random.default_rng(2))
    first = data.load_image_tree(root, workers=1)
    for cached in (cache / "images").iterdir():
        if damage == "truncated":
            cached.write_bytes(cached.read_bytes()[:200])
        else:
            with open(cached, "wb") as file:
                np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False,
                                                            "shape": (2**50,)})
    calls = count_decodes(monkeypatch)
    again = data.load_image_tree(root, workers=1)
    assert sorted(calls) == [12, 27]  # both splits decoded again
    np.testing.assert_array_equal(again.train_images, first.train_images)


def test_the_cache_is_not_inside_the_users_folder_and_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTNET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folders.cache_folder() == tmp_path / "xdg" / "fastnet"
    monkeypatch.setenv("FASTNET_CACHE", str(tmp_path / "mine"))
    assert folders.cache_folder() == tmp_path / "mine"


def test_a_broken_image_stops_the_load_with_its_name_and_leaves_no_cache(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(4))
    bad = save_image(root / "train" / "ant" / "broken.jpg", "RGB", np.random.default_rng(5), size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    with pytest.raises(FastnetError, match=r"broken\.jpg: this JPEG file is damaged or truncated"):
        data.load_image_tree(root, workers=1)
    bad.write_bytes(b"")
    with pytest.raises(FastnetError, match=r"broken\.jpg: not an image file Pillow can read"):
        data.load_image_tree(root, workers=2)
    assert not cache.exists() or not any(cache.rglob("*.*"))


def test_a_load_stopped_while_writing_the_cache_leaves_no_file_behind(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "pets", np.random.default_rng(18))

    def stopped(out, array, **kwargs):
        out.write(b"\x93NUMPY half of a header")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        data.load_image_tree(root, workers=1)
    assert list((cache / "images").iterdir()) == []


def test_an_unwritable_cache_is_one_warning_and_the_load_goes_on(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FASTNET_CACHE", str(tmp_path / "a-file"))  # a folder cannot be made under a file
    root = make_tree(tmp_path / "pets", np.random.default_rng(19))
    dataset = data.load_image_tree(root, workers=1)
    assert len(dataset.train_labels) == 27
    assert any(w.startswith(f"could not cache the decoded images in {tmp_path / 'a-file' / 'images'}")
               for w in dataset.warnings)


def test_images_of_different_sizes_are_one_error_naming_two_files_and_their_sizes(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(6))
    save_image(root / "train" / "zebra" / "wide.png", "RGB", np.random.default_rng(7), size=(5, 9))
    with pytest.raises(FastnetError) as error:
        data.load_image_tree(root, workers=1)
    message = str(error.value)
    assert f"{root.resolve()}/train/zebra/wide.png is 5x9 and {root.resolve()}/train/Moth/000.png is 5x6" in message
    assert "pass --image-size HxW (for example --image-size 5x6) to resize them all to one" in message


def test_image_size_stretches_every_image_as_pillow_does_and_has_a_cache_of_its_own(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "pets", np.random.default_rng(6))
    save_image(root / "train" / "zebra" / "wide.png", "RGB", np.random.default_rng(7), size=(5, 9))
    one_size = data.load_dataset(root, image_size="4x3")
    assert one_size.sample_shape == (4, 3, 3) and one_size.source.endswith(", resized to 4x3")
    wide = pillow_pixels(root / "train" / "zebra" / "wide.png")
    stretched = np.asarray(Image.fromarray(wide).resize((3, 4), Image.Resampling.LANCZOS))
    names = sorted(p.name for p in (root / "train" / "zebra").iterdir() if p.name not in JUNK)
    index = 18 + names.index("wide.png")  # after Moth's 9 and ant's 9
    np.testing.assert_array_equal(one_size.train_images[index], stretched)
    first = np.asarray(Image.fromarray(pillow_pixels(root / "train" / "Moth" / "000.png")).resize(
        (3, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(one_size.train_images[0], first)
    calls = count_decodes(monkeypatch)
    data.load_dataset(root, image_size=(4, 3))
    assert calls == []  # "4x3" and (4, 3) are one size, and one cache
    data.load_dataset(root, image_size=(3, 4))
    assert calls == [28, 12]


def test_image_size_is_refused_on_arrays_and_when_malformed(tmp_path, tiny_npy):
    with pytest.raises(SettingError, match="drop image_size"):
        data.load_dataset(tiny_npy, image_size=(4, 4))
    for bad in ("32", "0x4", "ax4", (4,), (4, 2.5)):
        with pytest.raises(SettingError, match="image_size is a size in pixels, height x width"):
            data.load_image_tree(tmp_path, image_size=bad)


def test_an_unreadable_file_is_one_error_naming_it(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "pets", np.random.default_rng(8))
    locked = root / "train" / "ant" / "003.png"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file: make the open meet the error it would get
        opened = os.open

        def refuse(path, *args, **kwargs):
            if pathlib.Path(path) == locked.resolve():
                raise PermissionError(13, "Permission denied", str(path))
            return opened(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(FastnetError, match=r"003\.png: cannot be read .*check its permissions"):
        data.load_image_tree(root, workers=1)


@pytest.mark.parametrize("damage, words", [
    (lambda root: [p.unlink() for p in (root / "train" / "ant").iterdir()], ["train/ant has no image files",
                                                                              "drop the folder"]),
    (lambda root: save_image(root / "test" / "bee" / "1.png", "RGB", np.random.default_rng(0)),
     ["test/bee is a class that", "lacks"]),
    (lambda root: [p.unlink() for p in (root / "test" / "ant").iterdir()], ["test/ant has no image files"]),
])
def test_bad_trees_are_one_line_data_errors(tmp_path, cache, damage, words):
    root = make_tree(tmp_path / "pets", np.random.default_rng(9))
    damage(root)
    with pytest.raises(DataError) as error:
        data.load_dataset(root)
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_an_empty_tree_says_what_to_make(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train has no class folders: make one folder per class"):
        data.load_dataset(tmp_path / "empty")


def test_a_class_that_test_lacks_has_no_test_images_and_keeps_its_label(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(10))
    for path in (root / "test" / "ant").iterdir():
        path.unlink()
    (root / "test" / "ant").rmdir()
    dataset = data.load_dataset(root)
    assert dataset.class_names == ("Moth", "ant", "zebra")
    assert sorted(set(dataset.test_labels.tolist())) == [0, 2]


def test_without_test_a_fraction_is_held_out_stratified_and_seeded(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(11), counts={"train": 20}, splits=("train",))
    with pytest.raises(DataError, match=r"no test/ folder: make .*or pass --test-fraction 0\.1"):
        data.load_dataset(root)
    dataset = data.load_dataset(root, test_fraction=0.25, rng=np.random.default_rng(3))
    assert np.bincount(dataset.test_labels).tolist() == [5, 5, 5]
    assert np.bincount(dataset.train_labels).tolist() == [15, 15, 15]
    assert dataset.notes == ((f"held out 15 of the 60 images of {root.resolve()}/train as the test split "
                              "(--test-fraction 0.25, stratified by class, drawn with --seed)"),)
    same = data.load_dataset(root, test_fraction=0.25, rng=np.random.default_rng(3))
    other = data.load_dataset(root, test_fraction=0.25, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(same.test_images, dataset.test_images)
    assert not np.array_equal(other.test_images, dataset.test_images)
    # Together the two splits are the whole of train/, each image once.
    _, everything, _ = expected(root, "train")
    both = np.concatenate([dataset.train_images, dataset.test_images]).reshape(60, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, everything.reshape(60, -1)))


def test_hold_out_draws_from_the_generator_and_keeps_a_sample_of_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2])
    held = folders.hold_out(labels, 0.5, np.random.default_rng(0))
    assert [int(held[labels == k].sum()) for k in range(3)] == [5, 2, 0]
    np.testing.assert_array_equal(held, folders.hold_out(labels, 0.5, np.random.default_rng(0)))


def test_a_test_fraction_with_a_test_folder_or_other_data_is_refused(tmp_path, cache, tiny_npy):
    root = make_tree(tmp_path / "pets", np.random.default_rng(12))
    with pytest.raises(SettingError, match="has one: drop test_fraction"):
        data.load_dataset(root, test_fraction=0.1)
    with pytest.raises(SettingError, match="with its own: drop test_fraction"):
        data.load_dataset(tiny_npy, test_fraction=0.1)
    with pytest.raises(SettingError, match=r"test_fraction is the share .* in \[0, 1\), got 1.5"):
        data.load_dataset(root, test_fraction=1.5)


@pytest.mark.cifar
def test_the_cifar10_jpeg_tree_loads_to_the_images_and_labels_of_the_batches(cifar, tmp_path, monkeypatch):
    """tools/build_test_data.sh unzips ../shared/cifar10/cifar10-jpeg.zip beside the batches it builds
    from the same zip; the two must hold the same images with the same labels, in another order."""
    tree = real_data_path() / "cifar10-jpeg"
    if not (tree / "train").is_dir():
        unavailable(f"no {tree}: run tools/build_test_data.sh (see docs/testing.md)")
    monkeypatch.setenv("FASTNET_CACHE", str(tmp_path / "cache"))
    loaded = data.load_dataset(tree)
    # CIFAR-10's own order of classes happens to be alphabetical, so the labels are the same numbers.
    assert loaded.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")

    def canonical(images, labels):
        rows = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], axis=1)
        return np.unique(rows, axis=0, return_counts=True)

    for split in ("train", "test"):
        ours = canonical(getattr(loaded, f"{split}_images"), getattr(loaded, f"{split}_labels"))
        theirs = canonical(getattr(cifar, f"{split}_images"), getattr(cifar, f"{split}_labels"))
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


def test_fastnet_train_on_a_tree_reports_skipped_files_and_the_held_out_split(tmp_path):
    root = make_tree(tmp_path / "pets", np.random.default_rng(13), counts={"train": 20}, splits=("train",))
    result = fastnet("train", "--data", root, "--test-fraction", "0.25", "--epochs", 1, "--hidden", 4,
                     "--batch-size", 8, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"warning: skipped 3 files in {root.resolve()} that are not an image by name or not in a class folder: " \
           "train/zebra/.DS_Store, train/zebra/Thumbs.db, train/zebra/notes.txt" in lines
    assert any(line.startswith("held out 15 of the 60 images") for line in lines), result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["test_fraction"] == 0.25 and config["train_size"] == 45
    assert config["data_source"] == f"image tree {root.resolve()}"


def test_a_run_on_resized_images_records_the_size_and_predict_resizes_alike(tmp_path):
    root = make_tree(tmp_path / "pets", np.random.default_rng(14))
    other = save_image(root / "train" / "ant" / "big.png", "RGB", np.random.default_rng(15), size=(12, 10))
    trained = fastnet("train", "--data", root, "--image-size", "4x4", "--epochs", 1, "--hidden", 4,
                      "--batch-size", 8, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == [4, 4]
    predicted = fastnet("predict", tmp_path / "run", other)
    assert predicted.returncode == 0, predicted.stderr
    assert "big.png" in predicted.stdout


def test_evaluate_on_a_tree_uses_the_runs_image_size_and_held_out_split(tmp_path):
    root = make_tree(tmp_path / "pets", np.random.default_rng(16), counts={"train": 20}, splits=("train",))
    save_image(root / "train" / "ant" / "big.png", "RGB", np.random.default_rng(17), size=(12, 10))
    trained = fastnet("train", "--data", root, "--test-fraction", "0.25", "--image-size", "4x4", "--seed", "3",
                      "--epochs", 2, "--hidden", 8, "--batch-size", 8, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    evaluated = fastnet("evaluate", tmp_path / "run", "--data", root, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["images"] == 15  # a quarter of 20, 21 and 20 images, rounded
    assert report["accuracy"] == pytest.approx(last["test_acc"])


def test_a_val_folder_is_a_validation_split_of_its_own_that_replaces_val(tmp_path, cache):
    root = make_tree(tmp_path / "pets", np.random.default_rng(20), counts={"train": 9, "test": 4, "val": 3},
                     splits=("train", "test", "val"))
    dataset = data.load_image_tree(root, workers=1)
    _, val_images, val_labels = expected(root, "val")
    np.testing.assert_array_equal(dataset.val_images, val_images)
    np.testing.assert_array_equal(dataset.val_labels, val_labels)
    assert data.load_image_tree(make_tree(tmp_path / "plain", np.random.default_rng(20))).val_images is None

    trained = fastnet("train", "--data", root, "--epochs", 1, "--hidden", 4, "--batch-size", 8,
                      "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert "val_acc" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    refused = fastnet("train", "--data", root, "--val", 5, "--out", tmp_path / "run2")
    assert refused.returncode == 2 and "has a val/ folder, which is validated on instead: drop --val" in refused.stderr
    assert not (tmp_path / "run2").exists()


def test_decoding_workers_leave_ctrl_c_to_the_parent(monkeypatch):
    """A worker interrupted inside the pool's queue could leave the pool hung: they ignore SIGINT,
    and the parent, which does not, stops the load (measured by hand: `fastnet train` on the CIFAR-10
    tree, SIGINT to its process group 3 s in, exits with status 130 in 0.4 s, leaving no cache)."""
    seen = []

    class Recording(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.submit(signal.getsignal, signal.SIGINT).result())
    monkeypatch.setattr(folders, "EXECUTOR", Recording)
    monkeypatch.setattr(folders, "CHUNK", 1)
    folders.decode_all(pathlib.Path("/nonexistent"), [], ("x", (1, 1, 3), False), workers=2)  # no chunks: no pool
    assert seen == []
    tree = pathlib.Path(__file__).parent  # any two files: the pool is made before any is decoded
    with pytest.raises(FastnetError):
        folders.decode_all(tree, ["helpers.py", "conftest.py"], ("x", (1, 1, 3), False), workers=2)
    assert seen == [signal.SIG_IGN]
