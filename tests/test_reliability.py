"""Reliability, through the real `fastnet` command in a subprocess, as a user meets it.

- Every bad input in CASES gets one line on stderr that names the problem and what to do, exit
  status 2, no traceback, and leaves no file behind.
- Divergence exits with status 3 and keeps the last good checkpoint as it was.
- A run stopped by a crash, SIGINT, SIGTERM or kill -9 resumes with `--resume` and ends with exactly
  the parameters and metrics of a run that never stopped, on each backend.
"""

import json
import os
import random
import shutil
import signal
import time
import zipfile

import numpy as np
import pytest

from fastnet import __version__, backends, checkpoint, precision, storage
from fastnet.config import TrainConfig
from fastnet.run_folder import resumed_config
from fastnet.train import train
from helpers import (
    ROOT,
    assert_one_line_error,
    assert_same_outcome,
    declaring_png,
    fastnet,
    make_arrays,
    make_tree,
    save_image,
    sparse_file,
    start_fastnet,
    write_archive,
    write_batches,
    write_npy,
)

# Words of advice, one of which every error message must contain: it says what to do, not only what is wrong.
ADVICE = ("pass", "use", "choose", "drop", "see", "run", "replace", "fix", "save", "retrain", "download",
          "rewrite", "rebuild", "renumber", "resize", "supply", "lower", "make", "check", "free")


# --- The bad-input table -----------------------------------------------------------------------------
# Each case builds what it needs under `root` and returns the command's arguments. `tiny` is a small
# valid npy dataset, `run` the folder of a finished run on it (model.npz, checkpoint.npz).

def npy_with(flags=(), **changes):
    """A valid npy dataset (the arrays of test_data.make_arrays) with some arrays changed, and the
    `fastnet train` flags to use it with."""
    def build(root, tiny, run):
        arrays = make_arrays()
        for key, change in changes.items():
            arrays[key] = change(arrays[key])
        return ["train", "--data", write_npy(root / "bad", arrays, names=[f"c{i}" for i in range(10)]), *flags]
    return build


def labelled(write, train, test):
    """`fastnet train` on make_arrays' dataset in the layout `write` writes (write_npy, write_batches),
    its labels changed by `train` and `test`, and no class names: the labels are all there is."""
    def build(root, tiny, run):
        arrays = make_arrays()
        arrays["train_labels"], arrays["test_labels"] = train(arrays["train_labels"]), test(arrays["test_labels"])
        return ["train", "--data", write(root / "labelled", arrays, names=None), "--batch-size", "5"]
    return build


def truncated(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def with_one(value, at=0):
    def change(array):
        array = array.astype(np.float64) if isinstance(value, float) else array.copy()
        array.reshape(-1)[at] = value
        return array
    return change


def copy_of(run, name, root, transform=lambda raw: raw):
    target = root / "copy.npz"
    target.write_bytes(transform((run / name).read_bytes()))
    return target


def resumable_copy(run, root, name="checkpoint.npz", transform=lambda raw: raw):
    """A copy of the finished run's folder whose checkpoint says it has epochs left to train."""
    folder = root / "resumable"
    folder.mkdir()
    (folder / "checkpoint.npz").write_bytes(transform((run / name).read_bytes()))
    return folder


def other_data(root, shape=(4, 4, 3), classes=3, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "other"
    folder.mkdir()
    for split, count in (("train", 60), ("test", 20)):
        np.save(folder / f"{split}_images.npy", rng.integers(0, 256, (count, *shape), dtype=np.uint8))
        np.save(folder / f"{split}_labels.npy", np.arange(count) % classes)
    return folder


def tree_with(change=lambda tree: None, flags=()):
    """`fastnet train` on a small image tree (tests/test_folders.make_tree) after `change` to it."""
    def build(root, tiny, run):
        tree = make_tree(root / "pets", np.random.default_rng(0))
        change(tree)
        return ["train", "--data", tree, *flags]
    return build


def predict_on(make_args):
    """`fastnet predict` with the finished run on a folder of one image, photos/, and `make_args(root)`."""
    def build(root, tiny, run):
        (root / "photos" / "deeper").mkdir(parents=True)
        save_image(root / "photos" / "deeper" / "a.png", "RGB", np.random.default_rng(0), size=(4, 4))
        return ["predict", run, root / "photos", *make_args(root)]
    return build


def flat_run(command):
    """`fastnet evaluate` or `predict` with --tta flip+shift on a run trained on flat samples (48,), which
    have no height or width to mirror and shift."""
    def build(root, tiny, run):
        data = brightness_classes(root / "flat", seed=0, classes=3, train=60, test=30, shape=(48,), step=80,
                                  offset=40, noise=20)
        train(TrainConfig(data=str(data), epochs=1, hidden=(4,), batch_size=20, out=str(root / "flat-run")),
              log=lambda line: None)
        image = save_image(root / "image.png", "RGB", np.random.default_rng(0), size=(4, 4))
        where = ["--data", data] if command == "evaluate" else [image]
        return [command, root / "flat-run", *where, "--tta", "flip+shift"]
    return build


def only_junk(root, tiny, run):
    folder = root / "junk" / "deeper"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    os.symlink(root / "junk", folder / "loop")
    return ["predict", run, root / "junk"]


def broken_jpeg(tree, keep=0.5):
    path = save_image(tree / "train" / "ant" / "broken.jpg", "RGB", np.random.default_rng(1), size=(64, 64))
    path.write_bytes(path.read_bytes()[:int(len(path.read_bytes()) * keep)])


def emptied(folder):
    for path in folder.iterdir():
        path.unlink()


def without(folder):
    emptied(folder)
    folder.rmdir()


def foreign_npz(root):
    np.savez(root / "foreign.npz", weights=np.zeros(3))
    return root / "foreign.npz"


def pickled_npz(root):
    np.savez(root / "pickled.npz", format=np.array(checkpoint.FORMAT),
             config=np.array([{"code": "would run on load"}], dtype=object))
    return root / "pickled.npz"


def declaring_npy(file, shape):
    """An .npy file whose header declares a uint8 array of `shape`, followed by a few bytes of it."""
    np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
    file.write(bytes(64))


# A petabyte: beyond any machine's memory and a process's address space, whatever the kernel's overcommit.
PETABYTE = (2**50,)


def npy_declaring_a_petabyte(root, tiny):
    folder = root / "petabyte-npy"
    shutil.copytree(tiny, folder)
    with open(folder / "train_images.npy", "wb") as file:
        declaring_npy(file, (*PETABYTE, 4, 4, 3))
    return folder


def npz_declaring_a_petabyte(root):
    with zipfile.ZipFile(root / "petabyte.npz", "w") as archive, archive.open("param_0.npy", "w") as member:
        declaring_npy(member, PETABYTE)
    return root / "petabyte.npz"


def links_in_a_loop(tree):
    os.symlink("b.png", tree / "train" / "ant" / "a.png")
    os.symlink("a.png", tree / "train" / "ant" / "b.png")


def edited_copy(original, folder, changes):
    """A copy of the .npz file `original` in `folder` with `changes`: each replaces an array by a value, by
    what a function makes of the array (of the JSON object of config), or removes it (None)."""
    with np.load(original) as f:
        arrays = {name: f[name] for name in f.files}
    for name, change in changes.items():
        if change is None:
            arrays.pop(name)
        elif name == "config" and callable(change):
            arrays[name] = np.array(json.dumps(change(json.loads(str(arrays[name])))))
        else:
            arrays[name] = np.asarray(change)
    folder.mkdir(parents=True)
    np.savez(folder / original.name, **arrays)
    return folder / original.name


def edited_model(**changes):
    """`fastnet evaluate` with a copy of the finished run's model.npz edited (edited_copy)."""
    return lambda root, tiny, run: ["evaluate", edited_copy(run / "model.npz", root / "edited", changes), "--data",
                                    tiny]


CASES = {
    # The command line
    "unknown command": (lambda root, tiny, run: ["fly"], ["invalid choice: 'fly'"]),
    "unknown flag": (lambda root, tiny, run: ["train", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    "unknown backend": (lambda root, tiny, run: ["train", "--backend", "cuda"], ["unknown backend 'cuda'", "numpy"]),
    "unknown optimizer": (lambda root, tiny, run: ["train", "--optimizer", "lbfgs"], ["--optimizer", "'lbfgs'"]),
    "unknown schedule": (lambda root, tiny, run: ["train", "--schedule", "sometimes"], ["--schedule", "'sometimes'"]),
    "hidden not numbers": (lambda root, tiny, run: ["train", "--hidden", "512,x"],
                           ["--hidden", "comma list of positive integers"]),
    "hidden negative": (lambda root, tiny, run: ["train", "--hidden", "512,-1"], ["--hidden", "'512,-1'"]),
    "hidden empty": (lambda root, tiny, run: ["train", "--hidden", ""], ["--hidden"]),
    "zero epochs": (lambda root, tiny, run: ["train", "--epochs", "0"], ["--epochs", "not positive"]),
    "fractional epochs": (lambda root, tiny, run: ["train", "--epochs", "2.5"], ["--epochs", "not a whole number"]),
    "negative batch size": (lambda root, tiny, run: ["train", "--batch-size", "-8"], ["--batch-size", "not positive"]),
    "zero lr": (lambda root, tiny, run: ["train", "--lr", "0"], ["--lr must be a positive number"]),
    "negative lr": (lambda root, tiny, run: ["train", "--lr", "-1"], ["--lr must be a positive number"]),
    "nan lr": (lambda root, tiny, run: ["train", "--lr", "nan"], ["--lr must be a positive number"]),
    "momentum of 1.5": (lambda root, tiny, run: ["train", "--momentum", "1.5"], ["--momentum must be in [0, 1)"]),
    "batch larger than the data": (lambda root, tiny, run: ["train", "--batch-size", "1000"],
                                   ["--batch-size 1000", "300 training images"]),
    "val too large": (lambda root, tiny, run: ["train", "--val", "300"],
                      ["--val 300", "between 1 and 297", "in 3 classes, and each class keeps one"]),
    "negative val": (lambda root, tiny, run: ["train", "--val", "-5"], ["--val must be 0 or more"]),
    "zero checkpoint-every": (lambda root, tiny, run: ["train", "--checkpoint-every", "0"],
                              ["--checkpoint-every", "not positive"]),
    "zero eval-every": (lambda root, tiny, run: ["train", "--eval-every", "0"], ["--eval-every", "not positive"]),
    "unknown activation": (lambda root, tiny, run: ["train", "--activation", "swish"], ["--activation", "'swish'"]),
    "unknown norm": (lambda root, tiny, run: ["train", "--norm", "batchnorm"], ["--norm", "layernorm or none"]),
    "dropout of 1": (lambda root, tiny, run: ["train", "--dropout", "1"], ["--dropout is a rate in [0, 1)"]),
    "negative label smoothing": (lambda root, tiny, run: ["train", "--label-smoothing", "-0.1"],
                                 ["--label-smoothing must be in [0, 1)"]),
    "negative translate": (lambda root, tiny, run: ["train", "--translate", "-2"],
                           ["--translate is a size in pixels, got -2"]),
    "zero clip": (lambda root, tiny, run: ["train", "--clip", "0"], ["--clip must be a positive gradient norm"]),
    "ema of 1": (lambda root, tiny, run: ["train", "--ema", "1"], ["--ema is a decay per step, in (0, 1), got 1.0"]),
    "zero ema": (lambda root, tiny, run: ["train", "--ema", "0"], ["--ema is a decay per step, in (0, 1), got 0.0"]),
    "negative ema": (lambda root, tiny, run: ["train", "--ema", "-0.5"], ["--ema is a decay per step", "got -0.5"]),
    "nan ema": (lambda root, tiny, run: ["train", "--ema", "nan"], ["--ema is a decay per step", "got nan"]),
    "word ema": (lambda root, tiny, run: ["train", "--ema", "abc"], ["--ema", "'abc' is not a decay", "or none"]),
    "ema above 1": (lambda root, tiny, run: ["train", "--ema", "1.5"], ["--ema is a decay per step", "got 1.5",
                                                                       "such as 0.9998"]),
    "unknown recipe": (lambda root, tiny, run: ["train", "--recipe", "slow"], ["--recipe", "'slow'"]),
    "flip on samples that are not images": (npy_with(["--flip", "--batch-size", "5"],
                                                     train_images=lambda x: x.reshape(len(x), -1),
                                                     test_images=lambda x: x.reshape(len(x), -1)),
                                            ["--flip", "need images", "drop those flags"]),
    "tta on samples that are not images": (npy_with(["--tta", "flip", "--batch-size", "5"],
                                                    train_images=lambda x: x.reshape(len(x), -1),
                                                    test_images=lambda x: x.reshape(len(x), -1)),
                                           ["--tta", "need images", "drop those flags"]),
    "zero threads": (lambda root, tiny, run: ["train", "--threads", "0"], ["--threads", "not positive"]),
    "unwritable out": (lambda root, tiny, run: ["train", "--out", (root / "a-file").touch() or root / "a-file" / "run"],
                       ["cannot write to --out"]),
    "bench on an unknown backend": (lambda root, tiny, run: ["bench", "--backend", "numpy,cuda"],
                                    ["unknown backend 'cuda'"]),
    "data without action": (lambda root, tiny, run: ["data"], ["fastnet data download"]),
    "evaluate without model": (lambda root, tiny, run: ["evaluate"], ["required: RUN_DIR|MODEL"]),
    # Data
    "data path missing": (lambda root, tiny, run: ["train", "--data", root / "nowhere"], ["nowhere", "does not exist"]),
    "data is a plain file": (lambda root, tiny, run: ["train", "--data", (root / "notes.txt").write_text("hi") and
                                                      root / "notes.txt"], ["notes.txt", "not a tar archive"]),
    "archive truncated": (lambda root, tiny, run: ["train", "--data", truncated(
        write_archive(root / "cifar-10-python.tar.gz", make_arrays()))], ["cifar-10-python.tar.gz", "truncated"]),
    "pickle batch truncated": (lambda root, tiny, run: ["train", "--data", truncated(
        write_batches(root / "b", make_arrays()) / "data_batch_3").parent], ["data_batch_3", "truncated"]),
    "npy counts differ": (npy_with(train_labels=lambda x: x[:-1]), ["35 images but 34 labels"]),
    "npy shapes differ": (npy_with(test_images=lambda x: x[:, :16, :16]), ["same sample shape"]),
    "images of dtype int16": (npy_with(train_images=lambda x: x.astype(np.int16)), ["int16", "uint8"]),
    "float images beyond [0, 1]": (npy_with(train_images=lambda x: x / 100.0), ["not [0, 1]"]),
    "NaN pixel": (npy_with(train_images=lambda x: with_one(np.nan)(x / 255.0)), ["NaN"]),
    "infinite pixel": (npy_with(test_images=lambda x: with_one(np.inf, at=7)(x / 255.0)), ["infinite"]),
    "negative label": (npy_with(train_labels=with_one(-1, at=2)), ["negative labels"]),
    "fractional labels": (npy_with(test_labels=lambda x: x + 0.5), ["must be integers"]),
    "label beyond the classes": (npy_with(test_labels=with_one(12)), ["label 12", "past the 10 classes"]),
    # One mistyped label among 10 classes, and no class_names.txt: not 90 classes.
    "a label far past the others": (lambda root, tiny, run: ["train", "--data", write_npy(
        root / "typo", make_arrays() | {"train_labels": with_one(99, at=5)(make_arrays()["train_labels"])})],
        ["train_labels.npy: label 99 at index 5", "89 classes (10 to 98)", "class_names.txt"]),
    # Image trees
    "tree with a truncated JPEG": (tree_with(broken_jpeg), ["train/ant/broken.jpg", "damaged or truncated"]),
    "tree with a zero-byte image": (tree_with(lambda tree: broken_jpeg(tree, keep=0)),
                                    ["train/ant/broken.jpg", "not an image file"]),
    "tree with a class folder without images": (tree_with(lambda tree: emptied(tree / "train" / "ant")),
                                                ["train/ant has no image files"]),
    "tree without class folders": (tree_with(lambda tree: [without(f) for f in (tree / "train").iterdir()]),
                                   ["train has no class folders"]),
    "tree with a test class that train lacks": (tree_with(lambda tree: (tree / "test" / "ant").rename(
        tree / "test" / "bee")), ["test/bee is a class that", "lacks"]),
    "tree without test and --test-fraction": (tree_with(lambda tree: [without(f) for f in (tree / "test").iterdir()]
                                                        and (tree / "test").rmdir()), ["no test/ folder",
                                                                                       "--test-fraction 0.1"]),
    "tree with images of two sizes": (tree_with(lambda tree: save_image(
        tree / "train" / "zebra" / "big.png", "RGB", np.random.default_rng(2), size=(7, 6))),
        ["train/zebra/big.png is 7x6", "train/Moth/000.png is 5x6", "--image-size 5x6"]),
    "test fraction with a test folder": (tree_with(flags=["--test-fraction", "0.2"]),
                                         ["--test-fraction holds out", "drop --test-fraction"]),
    "test fraction of 1": (tree_with(flags=["--test-fraction", "1"]), ["--test-fraction is the share", "got 1.0"]),
    "test fraction on npy data": (lambda root, tiny, run: ["train", "--test-fraction", "0.2"],
                                  ["its own: drop --test-fraction"]),
    "image size not HxW": (tree_with(flags=["--image-size", "32"]), ["--image-size", "'32' is not a size HxW"]),
    "image size on npy data": (lambda root, tiny, run: ["train", "--image-size", "4x4"],
                               ["resizes the images of an image tree", "drop --image-size"]),
    "empty test split": (npy_with(test_images=lambda x: x[:0], test_labels=lambda x: x[:0]),
                         ["test split", "no images"]),
    # Settings against the data they meet (the finished run's data: 300 training images of 4x4x3, 3 classes)
    "translate as large as the image": (lambda root, tiny, run: ["train", "--translate", "4"],
                                        ["--translate 4 can shift the 4x4 images wholly out of view",
                                         "pass at most 3"]),
    "translate past the shorter side": (npy_with(["--translate", "16", "--batch-size", "5"],
                                                 train_images=lambda x: x.reshape(len(x), 16, 64, 3),
                                                 test_images=lambda x: x.reshape(len(x), 16, 64, 3)),
                                        ["--translate 16", "16x64 images", "pass at most 15"]),
    "cutout larger than the image": (lambda root, tiny, run: ["train", "--cutout", "5"],
                                     ["--cutout 5 is a square larger than the 4x4 images", "pass at most 4"]),
    "batch larger than what val leaves": (lambda root, tiny, run: ["train", "--val", "250", "--batch-size", "64"],
                                          ["--batch-size 64 is larger than the 50 training images",
                                           "left after 250 are held out for validation",
                                           "pass at most 50, or hold out fewer than 250 for validation"]),
    "more pca components than what val leaves": (lambda root, tiny, run: ["train", "--pca", "45", "--val", "260",
                                                                          "--batch-size", "8"],
                                                 ["--pca 45 asks for more components than 40 images",
                                                  "(those left after 260 are held out for validation) of 48 inputs",
                                                  "pass at most 40, or hold out fewer than 260 for validation"]),
    "image size on a CIFAR-10 archive": (lambda root, tiny, run: ["train", "--data", write_archive(
        root / "cifar-10-python.tar.gz", make_arrays()), "--image-size", "8x8"],
        ["--image-size resizes the images of an image tree", "is a CIFAR-10 archive", "drop --image-size"]),
    "image size on CIFAR-10 batches": (lambda root, tiny, run: ["train", "--data", write_batches(
        root / "b", make_arrays()), "--image-size", "8x8"],
        ["--image-size resizes the images of an image tree", "is a CIFAR-10 batches folder", "drop --image-size"]),
    "npy test class that train lacks": (labelled(write_npy, train=lambda y: np.where(y == 9, 8, y),
                                                 test=with_one(9, at=2)),
                                        ["test_labels.npy: label 9 at index 2 is a class that no training image has",
                                         "list the classes in", "class_names.txt"]),
    "batches test class that train lacks": (labelled(write_batches, train=lambda y: np.where(y == 9, 8, y),
                                                     test=with_one(9, at=2)),
                                            ["test_batch in", "label 9 at index 2 is a class that no training",
                                             "list the classes in batches.meta"]),
    "npy of one class": (labelled(write_npy, train=np.zeros_like, test=np.zeros_like),
                         ["train_labels.npy: all labels are of one class, '0' (0)", "two or more",
                          "supply training images of at least one other class"]),
    "tree of one class": (tree_with(lambda tree: [shutil.rmtree(tree / split / name) for split in ("train", "test")
                                                  for name in ("Moth", "zebra")]),
                          ["the train split of image tree", "all labels are of one class, 'ant' (0)",
                           "supply training images"]),
    # Checkpoints
    "checkpoint missing": (lambda root, tiny, run: ["evaluate", root / "none.npz", "--data", tiny],
                           ["none.npz does not exist"]),
    "not a fastnet checkpoint": (lambda root, tiny, run: ["evaluate", foreign_npz(root), "--data", tiny],
                                 ["not a fastnet checkpoint"]),
    "not even a zip": (lambda root, tiny, run: ["evaluate", (root / "m.npz").write_text("hello") and root / "m.npz",
                                                "--data", tiny],
                       ["m.npz is not a fastnet checkpoint", "not even an .npz"]),
    "checkpoint truncated": (lambda root, tiny, run: ["evaluate", copy_of(run, "model.npz", root,
                                                                           lambda raw: raw[: len(raw) // 2]),
                                                      "--data", tiny], ["unreadable", "truncated"]),
    "checkpoint needing pickle": (lambda root, tiny, run: ["evaluate", pickled_npz(root), "--data", tiny],
                                  ["only pickle can load", "refused"]),
    "checkpoint declaring a petabyte": (lambda root, tiny, run: ["evaluate", npz_declaring_a_petabyte(root), "--data",
                                                                 tiny],
                                        ["petabyte.npz declares an array larger than this machine's memory",
                                         "(Unable to allocate", "it is truncated or corrupt"]),
    "npy declaring a petabyte": (lambda root, tiny, run: ["train", "--data", npy_declaring_a_petabyte(root, tiny)],
                                 ["train_images.npy declares an array larger than this machine's memory",
                                  "(Unable to allocate", "it is truncated or corrupt, so rewrite it"]),
    "model input size differs": (lambda root, tiny, run: ["evaluate", run / "model.npz", "--data",
                                                          other_data(root, shape=(5, 5, 3))],
                                 ["(48 inputs, 3 classes)", "has 75 inputs", "--data"]),
    "model classes differ": (lambda root, tiny, run: ["evaluate", run / "model.npz", "--data",
                                                      other_data(root, classes=4)], ["3 classes", "and 4"]),
    "resume without checkpoint": (lambda root, tiny, run: ["train", "--resume", root], ["no checkpoint.npz"]),
    "resume changing a setting": (lambda root, tiny, run: ["train", "--resume", run, "--lr", "0.5"],
                                  ["--resume continues", "drop --lr"]),
    "resume a truncated checkpoint": (lambda root, tiny, run: ["train", "--resume", resumable_copy(
        run, root, transform=lambda raw: raw[:-100])], ["unreadable"]),
    "resume a model without progress": (lambda root, tiny, run: ["train", "--resume", resumable_copy(
        run, root, name="model.npz")], ["no training progress"]),
    "resume on other data": (lambda root, tiny, run: ["train", "--resume", run, "--data", other_data(root)],
                             ["data differs", "--data"]),
    "negative pca": (lambda root, tiny, run: ["train", "--pca", "-2"],
                     ["--pca must be a number of components, got -2", "pass one such as 256"]),
    "more pca components than inputs": (lambda root, tiny, run: ["train", "--pca", "49"],
                                        ["--pca 49", "48 inputs", "pass at most 48"]),
    "whiten without pca": (lambda root, tiny, run: ["train", "--whiten"], ["--whiten", "add --pca K"]),
    "unknown tta": (lambda root, tiny, run: ["train", "--tta", "crop"],
                    ["--tta 'crop' is not a test-time augmentation: choose flip, flip+shift or none"]),
    "evaluate with an unknown tta": (lambda root, tiny, run: ["evaluate", run, "--tta", "crop"],
                                     ["--tta 'crop' is not a test-time augmentation: choose flip, flip+shift or none"]),
    "evaluate a model of flat samples with flip+shift": (flat_run("evaluate"), [
        "--tta flip+shift mirrors and shifts images, but these samples have shape (48,): pass --tta none"]),
    "predict with a model of flat samples and flip+shift": (flat_run("predict"), [
        "--tta flip+shift mirrors and shifts images, but this model takes samples of shape (48,): pass --tta none"]),
    "predict --csv into a missing folder": (predict_on(lambda root: ["--csv", root / "missing" / "p.csv"]),
                                            ["cannot write --csv", "missing/p.csv", "pass a path in a folder"]),
    "predict --csv under a file": (predict_on(lambda root: ["--csv", root / "photos" / "deeper" / "a.png" / "p.csv"]),
                                   ["cannot write --csv", "Not a directory", "pass a path in a folder"]),
    "predict on a tree of junk and a looping link": (only_junk,
                                                     ["no image files in", "junk or its subfolders", "pass image"]),
    "predict with an unknown tta": (lambda root, tiny, run: ["predict", run, root / "image.png", "--tta", "crop"],
                                    ["--tta 'crop' is not a test-time augmentation: choose flip, flip+shift or none"]),
    # Hostile files
    "tree with a decompression bomb": (tree_with(lambda tree: declaring_png(tree / "train" / "ant" / "bomb.png",
                                                                            50_000, 50_000)),
                                       ["train/ant/bomb.png: its header declares more than the 64 megapixels",
                                        "(8000 x 8000) fastnet decodes, so its pixels are not read", "resize it"]),
    "tree with an image over Pillow's warning": (tree_with(lambda tree: declaring_png(
        tree / "train" / "ant" / "big.png", 10_000, 10_000)),
        ["train/ant/big.png: its header declares 10000 x 10000 pixels", "more than the 64 megapixels"]),
    "tree with a named pipe for an image": (tree_with(lambda tree: os.mkfifo(tree / "train" / "ant" / "pipe.png")),
                                            ["train/ant/pipe.png: a named pipe (FIFO), not a regular file",
                                             "replace it with an image file, or remove it"]),
    "tree with a link to a device for an image": (tree_with(lambda tree: os.symlink(
        "/dev/zero", tree / "train" / "ant" / "zero.png")),
        ["train/ant/zero.png: a symbolic link to /dev/zero", "which is a character device, not a regular file"]),
    "tree with a 2 GiB file named .png": (tree_with(lambda tree: sparse_file(
        tree / "train" / "ant" / "huge.png", 2**31, head=(tree / "train" / "ant" / "000.png").read_bytes())),
        ["train/ant/huge.png: a file of 2.0 GiB", "larger than any image fastnet decodes needs (1 GiB at most)"]),
    "tree with a link that loops": (tree_with(links_in_a_loop), ["train/ant/a.png: a symbolic link that loops",
                                                                "fix or remove the link"]),
    "tree with a link to nothing": (tree_with(lambda tree: os.symlink(tree / "gone.png",
                                                                      tree / "train" / "ant" / "gone.png")),
                                    ["train/ant/gone.png: a symbolic link to", "gone.png, which does not exist"]),
    "model in a newer format": (edited_model(format="fastnet-checkpoint-2", fastnet_version="9.0.0"),
                                ["written by fastnet 9.0.0 in checkpoint format 2", "newer than the format 1",
                                 f"this fastnet {__version__} reads: use fastnet 9.0.0 to read it"]),
    "model in an older format from before versions": (edited_model(format="fastnet-checkpoint-0", fastnet_version=None),
                                                      ["written by a fastnet older than 0.1.0 in checkpoint format 0",
                                                       "retrain with this fastnet"]),
    "model without its format field": (edited_model(format=None), [f"written by fastnet {__version__} and altered",
                                                                   "its format field is missing"]),
    "model with an array removed": (edited_model(mean=None), ["altered since: it has no mean array; retrain"]),
    "model with a weight of the wrong shape": (edited_model(param_2=np.zeros((5, 3), np.float32)),
                                               ["altered since: param_2 is float32 (5, 3)",
                                                "where its sizes need float32 (4, 3)"]),
    "model with a nonsense config value": (edited_model(config=lambda config: config | {"tta": "sideways"}),
                                           ["altered since: its config sets tta to 'sideways', which no run can use"]),
    "checkpoint with its optimizer state cut": (lambda root, tiny, run: ["train", "--resume", edited_copy(
        run / "checkpoint.npz", root / "resumable", {"optim_velocity_1": None}).parent],
        ["resumable/checkpoint.npz was written by", "its optimizer state or progress is incomplete or malformed",
         "('optim_velocity_1')"]),
    "checkpoint of an --ema run without its average": (lambda root, tiny, run: ["train", "--resume", edited_copy(
        run / "checkpoint.npz", root / "resumable", {"config": lambda config: config | {"ema": 0.9}}).parent],
        ["resumable/checkpoint.npz was written by", "its weight average (--ema) is incomplete or malformed",
         "('ema_0')"]),
}


def brightness_classes(folder, seed, classes, train, test, shape, step, offset, noise):
    """An npy dataset whose class k is the brightness offset + k * step under Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, train + test)
    images = np.clip(labels.reshape(-1, *[1] * len(shape)) * step + offset
                     + rng.normal(0, noise, (train + test, *shape)), 0, 255).astype(np.uint8)
    return write_npy(folder, {"train_images": images[:train], "train_labels": labels[:train],
                              "test_images": images[train:], "test_labels": labels[train:]})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-epoch run on a tiny dataset like conftest's tiny_npy, and that dataset."""
    root = tmp_path_factory.mktemp("finished")
    tiny = brightness_classes(root / "tiny", seed=0, classes=3, train=300, test=90, shape=(4, 4, 3), step=80,
                              offset=40, noise=20)
    trained = fastnet("train", "--data", tiny, "--epochs", 1, "--hidden", 4, "--out", root / "run")
    assert trained.returncode == 0, trained.stderr
    return tiny, root / "run"


def snapshot(folder):
    """Each path under `folder` with its size and modification time; of a symbolic link, its own (its
    target may loop, or be gone)."""
    return {path: (path.lstat().st_size, path.lstat().st_mtime_ns) for path in folder.rglob("*")}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_with_status_2_and_writes_nothing(name, finished_run, tmp_path):
    build, phrases = CASES[name]
    tiny, run = finished_run
    args = build(tmp_path, tiny, run)
    if args[0] == "train" and "--data" not in args and "--resume" not in args:
        args = [*args, "--data", tiny]
    if args[0] == "train" and "--out" not in args and "--resume" not in args:
        args = [*args, "--out", tmp_path / "run"]
    before, run_before = snapshot(tmp_path), snapshot(run)

    # A bad input is refused at once and in little memory: a command that would hang (on a named pipe) or
    # take the machine's memory (decoding a bomb) fails the test instead.
    result = fastnet(*args, timeout=120, memory=2 * 2**30)

    assert_one_line_error(result, *phrases)
    assert any(word in result.stderr for word in ADVICE), f"no advice in: {result.stderr}"
    assert snapshot(tmp_path) == before and snapshot(run) == run_before, "a failed command left files behind"


def test_the_table_covers_what_the_issue_lists():
    assert len(CASES) > 50  # docs/testing.md promises more than 50 bad inputs


def test_every_bad_input_is_in_the_testing_guide():
    """docs/testing.md's table of bad inputs has a row for each case of CASES, and no other, whose
    message holds every phrase the case's test checks."""
    guide = (ROOT / "docs" / "testing.md").read_text()
    section = guide[guide.index("## Every bad input and what it gets"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip().replace("\\|", "|") for cell in line.replace("\\|", "\0").split("|")]
        cells = [cell.replace("\0", "|") for cell in cells]
        if len(cells) == 5 and cells[1] not in ("case", "---"):
            rows[cells[1]] = cells[3]
    assert sorted(rows) == sorted(CASES)
    for name, (_, phrases) in CASES.items():
        missing = [phrase for phrase in phrases if phrase not in rows[name]]
        assert not missing, f"{name}: the guide's message lacks {missing}"


def test_a_class_without_examples_is_reported_not_refused(tmp_path):
    arrays = make_arrays()
    arrays["train_labels"] = np.where(arrays["train_labels"] == 3, 4, arrays["train_labels"])
    data = write_npy(tmp_path / "data", arrays, names=[f"c{i}" for i in range(10)])
    result = fastnet("train", "--data", data, "--epochs", 1, "--hidden", 4, "--batch-size", 5, "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert "warning: class 'c3' (3) has no training examples" in result.stdout


def test_a_model_names_the_fastnet_that_wrote_it_and_one_from_before_versions_still_loads(finished_run, tmp_path):
    _, run = finished_run
    saved = checkpoint.load(str(run / "model.npz"))
    assert str(saved.arrays["fastnet_version"]) == __version__ and saved.writer == f"fastnet {__version__}"
    older = checkpoint.load(str(edited_copy(run / "model.npz", tmp_path / "older", {"fastnet_version": None})))
    assert older.writer == "a fastnet older than 0.1.0"
    assert all(np.array_equal(p, q) for p, q in zip(older.net.params, saved.net.params, strict=True))


def test_resuming_a_finished_run_changes_nothing(finished_run):
    _, run = finished_run
    before = snapshot(run)
    result = fastnet("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert "already finished its 1 epochs: nothing to resume" in result.stdout
    assert snapshot(run) == before


# --- Divergence ----------------------------------------------------------------------------------------

def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    tiny, _ = finished_run
    # A learning rate that warms up into divergence during the second epoch (found by trying).
    args = ["train", "--data", tiny, "--hidden", 8, "--epochs", 6, "--batch-size", 50, "--schedule", "constant",
            "--warmup", 0.9, "--lr", 1e3, "--out", tmp_path / "run"]
    result = fastnet(*args)
    assert result.returncode == 3, result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "diverged at epoch 2, step" in message[0] and "--lr 100" in message[0]

    saved = checkpoint.load(str(tmp_path / "run" / "checkpoint.npz"))
    assert all(np.isfinite(p).all() for p in saved.net.params)
    assert json.loads(str(saved.arrays["progress"]))["epochs_done"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1

    # Resuming diverges again, at the same place, and leaves the checkpoint byte for byte as it was.
    kept = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    again = fastnet("train", "--resume", tmp_path / "run")
    assert again.returncode == 3 and again.stderr == result.stderr
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == kept


# --- Resume ------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


# Dropout masks and augmentations draw from the run's generator every step: resuming must restore it.
REGULARISED = dict(activation="tanh", norm="layernorm", dropout=0.2, label_smoothing=0.1, flip=True, translate=1,
                   cutout=2, clip=2.0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("extra", [{}, REGULARISED, {"pca": 6, "flip": True}, {"pca": 6, "flip": True, "translate": 1},
                                   {"pca": 6, "whiten": True, "flip": True, "tta": "flip"},
                                   {"precision": "bf16"}, {"precision": "bf16", "pca": 6, **REGULARISED},
                                   {"ema": 0.9}, {"ema": 0.99, "precision": "bf16", "pca": 6, **REGULARISED}],
                         ids=["plain", "regularised", "pca-flip", "pca-translate", "whitened-tta", "bf16",
                              "bf16-pca-regularised", "ema", "ema-bf16-pca-regularised"])
def test_a_run_resumed_after_epoch_k_is_bit_identical(backend, extra, finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ANY_CPU, "1")  # bf16 on any CPU: the numbers, not the speed, are tested
    tiny, _ = finished_run
    settings = dict(data=str(tiny), backend=backend, hidden=(16, 8), epochs=4, batch_size=32, val=40, seed=3) | extra
    train(TrainConfig(**settings, out=str(tmp_path / "whole")), log=lambda line: None)

    def crash_after_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise Crash  # after epoch 2's checkpoint, as a power cut would

    with pytest.raises(Crash):
        train(TrainConfig(**settings, out=str(tmp_path / "cut")), log=crash_after_epoch_2)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    train(resumed_config(str(tmp_path / "cut")), log=lambda line: None, resume=True)

    assert_same_outcome(tmp_path / "cut", tmp_path / "whole")


# --- Signals and kill -9, on a run long enough to be stopped in the middle ----------------------------

@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A dataset, the arguments of a run on it that takes a few seconds and checkpoints every 5 steps,
    and that run's uninterrupted outcome per backend (computed when first asked for)."""
    root = tmp_path_factory.mktemp("long")
    data = brightness_classes(root / "data", seed=7, classes=4, train=3000, test=400, shape=(16, 16, 3), step=50,
                              offset=50, noise=70)
    references = {}

    def args(backend, out):
        return ["train", "--data", data, "--backend", backend, "--hidden", "512", "--epochs", 4, "--batch-size", 32,
                "--checkpoint-every", 5, "--out", out]

    def reference(backend):
        if backend not in references:
            result = fastnet(*args(backend, root / f"whole-{backend}"))
            assert result.returncode == 0, result.stderr
            references[backend] = root / f"whole-{backend}"
        return references[backend]

    return args, reference


def wait_for_checkpoint(path, process, newer_than=0):
    """Block until `path` exists with a modification time after `newer_than` (ns)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns > newer_than:
            return
        assert process.poll() is None, f"the run ended before writing a checkpoint: {process.communicate()}"
        time.sleep(0.005)
    pytest.fail("no checkpoint within 2 minutes")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(signum, status, backend, long_run, tmp_path):
    args, reference = long_run
    out = tmp_path / "run"
    process = start_fastnet(*args(backend, out))
    wait_for_checkpoint(out / "checkpoint.npz", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"fastnet: stopped by {signal.Signals(signum).name} at epoch ")
    assert lines[0].endswith(f"continue with: fastnet train --resume {out}")
    step = int(lines[0].split("step ")[1].split(";")[0])
    progress = json.loads(str(checkpoint.load(str(out / "checkpoint.npz")).arrays["progress"]))
    assert progress["step"] == step > 0

    resumed = fastnet("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at epoch {progress['epochs_done'] + 1}, step {step}" in resumed.stdout
    assert_same_outcome(out, reference(backend))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(backend, long_run, tmp_path):
    args, reference = long_run
    out = tmp_path / "run"
    moments = random.Random(backend)
    kills_after_a_checkpoint = 0
    for attempt in range(5):
        path = out / "checkpoint.npz"
        resuming = path.exists()
        last_write = path.stat().st_mtime_ns if resuming else 0
        process = start_fastnet(*(["train", "--resume", out] if resuming else args(backend, out)))
        if attempt == 0:
            time.sleep(moments.uniform(0.0, 0.5))  # most likely still starting up
        else:
            wait_for_checkpoint(path, process, newer_than=last_write)  # then somewhere in training,
            time.sleep(moments.uniform(0.0, 0.3))                      # perhaps mid-write
            kills_after_a_checkpoint += 1
        process.kill()
        process.communicate()
        assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
        if path.exists():  # whatever the moment, what carries the name is a whole checkpoint
            saved = checkpoint.load(str(path))
            assert "progress" in saved.arrays and all(np.isfinite(p).all() for p in saved.net.params)

    finished = fastnet("train", "--resume", out)
    assert finished.returncode == 0, finished.stderr
    assert kills_after_a_checkpoint == 4
    assert len(json.loads((out / "config.json").read_text())["resumed_at_step"]) >= 4
    assert not [name for name in os.listdir(out) if name.startswith(storage.TEMPORARY_PREFIX)]
    assert_same_outcome(out, reference(backend))


def test_a_numba_run_resumed_on_another_thread_count_ends_on_the_same_bits(finished_run, tmp_path):
    """The numba backend cuts its products by their shapes, not per thread, so a run cut on one thread
    and resumed on one or on two ends on the same bits, and says nothing about the change."""
    tiny, _ = finished_run
    settings = dict(data=str(tiny), backend="numba", hidden=(16, 8), epochs=3, batch_size=32, seed=3)

    def crash_after_epoch_1(line):
        if line.startswith("epoch 1/"):
            raise Crash

    notes, params = {}, {}
    for threads in (1, 2):
        out = tmp_path / f"cut-{threads}"
        with backends.use_threads("numba", 1), pytest.raises(Crash):
            train(TrainConfig(**settings, out=str(out)), log=crash_after_epoch_1)
        lines = []
        with backends.use_threads("numba", threads):
            train(resumed_config(str(out)), log=lines.append, resume=True)
        notes[threads] = [line for line in lines if line.startswith("note: ")]
        params[threads] = checkpoint.load(str(out / "model.npz")).net.params
    assert notes == {1: [], 2: []}
    assert all(p.tobytes() == q.tobytes() for p, q in zip(params[1], params[2], strict=True))
