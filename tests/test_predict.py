"""`fastnet predict` on image files and `fastnet.load(...)` on arrays: the same preprocessing and the
same logits as `fastnet evaluate`, and one line per unreadable file."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastnet
from fastnet import checkpoint
from fastnet.evaluation import evaluate, normalizer
from fastnet.model import MLP
from fastnet.predict import image_geometry, percent, softmax, top_k
from helpers import assert_one_line_error, declaring_png, sparse_file, start_fastnet
from helpers import fastnet as run_fastnet

NAMES = ["dark", "mid", "bright"]


@pytest.fixture
def tiny_model(tiny_npy, tmp_path):
    """A model trained by the real CLI on the tiny brightness data set (4x4x3 images, 3 classes)."""
    (tiny_npy / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    run = tmp_path / "run"
    trained = run_fastnet("train", "--data", tiny_npy, "--epochs", 3, "--hidden", 8, "--batch-size", 32,
                          "--out", run)
    assert trained.returncode == 0, trained.stderr
    return run / "model.npz"


def save_image(path, pixels):
    """(H, W) arrays become grey images, (H, W, 3) RGB and (H, W, 4) RGBA."""
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return path


def uniform(value, size=4):
    return np.full((size, size, 3), value, np.uint8)


def evaluate_path(model_path, images):
    """What `fastnet evaluate` computes for `images`: its predictions, and the logits of the rows it
    feeds the network, preprocessed by the same normalizer."""
    saved = checkpoint.load(str(model_path))
    flat = images.reshape(len(images), -1)
    shift, scale = normalizer(saved.mean, saved.std, flat.shape[1], flat.dtype, saved.net.dtype)
    predictions = evaluate(saved.net, flat, np.zeros(len(flat), np.int64), shift, scale).predictions
    logits = saved.net.forward(((flat - shift) * scale).astype(saved.net.dtype))
    return predictions, logits


def probabilities_by_name(entry):
    return {item["class"]: item["probability"] for item in entry["top"]}


def assert_scored_as(entries, model_path, images):
    """Each predict --json entry gives the probabilities fastnet.load gives the matching image array."""
    model = fastnet.load(model_path)
    for entry, pixels in zip(entries, images, strict=True):
        got = probabilities_by_name(entry)
        np.testing.assert_allclose([got[n] for n in NAMES], model.predict_proba(pixels)[0], rtol=1e-5, atol=1e-6)


# --- The command -----------------------------------------------------------------------------------

def test_predict_agrees_with_the_api_and_with_evaluate(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    pixels = np.stack([uniform(40), uniform(200), rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)])
    files = [save_image(tmp_path / "dark.png", pixels[0]), save_image(tmp_path / "bright.bmp", pixels[1]),
             save_image(tmp_path / "noise.png", pixels[2])]

    result = run_fastnet("predict", tiny_model, *files, "--top", 3, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["file"] for entry in report["predictions"]] == [str(f) for f in files]

    model = fastnet.load(tiny_model)
    assert model.class_names == NAMES
    expected = model.predict_proba(pixels)
    predictions, logits = evaluate_path(tiny_model, pixels)
    for entry, row, label, row_logits in zip(report["predictions"], expected, predictions, logits, strict=True):
        got = probabilities_by_name(entry)
        assert len(got) == 3
        np.testing.assert_allclose([got[name] for name in NAMES], row, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row, softmax(row_logits[None])[0], rtol=1e-5, atol=1e-6)
        assert entry["top"][0]["index"] == label
        assert [item["probability"] for item in entry["top"]] == sorted(got.values(), reverse=True)
    # The tiny data's classes are brightness levels: a trained model told apart dark and bright.
    assert [entry["top"][0]["class"] for entry in report["predictions"][:2]] == ["dark", "bright"]


def test_an_empty_batch_gives_empty_answers_of_the_right_shape(tiny_model):
    model = fastnet.load(tiny_model)
    for images in (np.zeros((0, *model.sample_shape), np.uint8), np.zeros((0, model.input_size), np.float32)):
        assert model.predict_proba(images).shape == (0, model.num_classes)
        assert model.predict(images).shape == (0,)


def test_text_output_shows_top_k_classes_most_likely_first(tiny_model, tmp_path):
    image = save_image(tmp_path / "mid.png", uniform(120))
    result = run_fastnet("predict", tiny_model, image, "--top", 2)
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    assert line.startswith(f"{image}: ")
    shown = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
    probabilities = fastnet.load(tiny_model).predict_proba(uniform(120))[0]
    best = np.argsort(-probabilities)[:2]
    assert [name for name, _ in shown] == [NAMES[i] for i in best]
    assert [text for _, text in shown] == [percent(float(probabilities[i])) for i in best]


def test_a_broken_file_gets_one_line_and_the_others_still_run(tiny_model, tmp_path):
    good = save_image(tmp_path / "good.png", uniform(200))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a picture")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    whole = save_image(tmp_path / "whole.png", noise).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    damaged = tmp_path / "damaged.png"  # whole length, but the compressed pixels overwritten halfway
    middle = len(whole) // 2
    damaged.write_bytes(whole[:middle] + bytes(200) + whole[middle + 200:])
    missing = tmp_path / "missing.jpg"
    also_good = save_image(tmp_path / "also-good.jpg", uniform(40))

    result = run_fastnet("predict", tiny_model, good, garbage, truncated, damaged, missing, also_good)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 4, result.stderr
    for line, path in zip(errors, (garbage, truncated, damaged, missing), strict=True):
        assert line.startswith(f"fastnet: error: {path}: "), line
        assert "; " in line  # the problem, then what to do
    assert "not an image" in errors[0] and "no such file" in errors[3]
    for line in errors[1:3]:  # the user's words, not Pillow's ("Truncated File Read")
        assert "this PNG file is damaged or truncated" in line and "replace it with an intact copy" in line, line
        assert "File Read" not in line
    printed = [line.split(": ")[0] for line in result.stdout.splitlines()]
    assert printed == [str(good), str(also_good)]


def test_json_reports_failures_alongside_predictions(tiny_model, tmp_path):
    good = save_image(tmp_path / "good.png", uniform(40))
    bad = tmp_path / "bad.bmp"
    bad.write_bytes(b"BM" + b"\0" * 10)
    result = run_fastnet("predict", tiny_model, good, bad, "--json", "--top", 1)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["top"] == 1
    ok, failed = report["predictions"]
    assert ok["file"] == str(good) and len(ok["top"]) == 1 and ok["top"][0]["class"] == "dark"
    assert failed["file"] == str(bad) and "error" in failed and "top" not in failed
    assert result.stderr.count("fastnet: error: ") == 1


def test_a_folder_means_the_image_files_in_it_sorted(tiny_model, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    save_image(folder / "b.png", uniform(200))
    save_image(folder / "a.JPG", uniform(40))
    save_image(folder / "c.bmp", uniform(120))
    (folder / "notes.txt").write_text("not an image, and not picked up")
    (folder / "sub.png").mkdir()
    result = run_fastnet("predict", tiny_model, folder, "--json")
    assert result.returncode == 0, result.stderr
    files = [entry["file"] for entry in json.loads(result.stdout)["predictions"]]
    assert files == [str(folder / name) for name in ("a.JPG", "b.png", "c.bmp")]


def nested_tree(root):
    """Images two folders deep with mixed-case suffixes, junk, a dot file and a symbolic link that
    loops back to the tree's root; the images' relative paths (sorted) and pixels."""
    images = {"a.png": uniform(40), "b/c.JPG": uniform(200), "b/d/e.Png": uniform(120),
              "b/d/f.bmp": uniform(90), "z/y/x.JPEG": uniform(230), "b.jpg": uniform(10)}
    for relative, pixels in images.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        save_image(root / relative, pixels)
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "d" / ".DS_Store").write_bytes(b"\0\0")
    os.symlink(root, root / "b" / "d" / "loop")  # to an ancestor: would never end
    os.symlink(root / "b", root / "z" / "again")  # to a folder read anyway: would read it twice
    return sorted(images), [images[name] for name in sorted(images)]


def test_a_folder_is_searched_recursively_each_image_once_in_sorted_order(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    names, pixels = nested_tree(folder)
    result = run_fastnet("predict", tiny_model, f"{folder}{os.sep}", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["predictions"]
    assert [entry["file"] for entry in entries] == [f"{folder}{os.sep}{name}" for name in names]
    assert_scored_as(entries, tiny_model, pixels)
    for entry, name in zip(entries, names, strict=True):  # as if each file were predicted alone
        alone = run_fastnet("predict", tiny_model, folder / name, "--json")
        assert json.loads(alone.stdout)["predictions"][0]["top"] == entry["top"]
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith(f"fastnet: warning: skipped 2 files in {folder}{os.sep} that are not images")
    assert "b/d/.DS_Store" in warnings[0] and "b/notes.txt" in warnings[0]
    assert warnings[1].startswith("fastnet: warning: did not follow 2 symbolic links")
    assert "b/d/loop" in warnings[1] and "z/again" in warnings[1]


def test_a_link_to_a_folder_outside_the_tree_is_followed(tiny_model, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_image(outside / "o.png", uniform(40))
    folder = tmp_path / "photos"
    folder.mkdir()
    save_image(folder / "p.png", uniform(200))
    os.symlink(outside, folder / "linked")
    result = run_fastnet("predict", tiny_model, folder, "--json")
    assert result.returncode == 0 and not result.stderr, result.stderr
    files = [entry["file"] for entry in json.loads(result.stdout)["predictions"]]
    assert files == [str(folder / "linked" / "o.png"), str(folder / "p.png")]


def named_pipe(folder):
    os.mkfifo(folder / "pipe.png")
    return [folder / "pipe.png"]


def link_to_a_device(folder):
    os.symlink("/dev/zero", folder / "zero.png")
    return [folder / "zero.png"]


def links_in_a_loop(folder):
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    return [folder / "a.png", folder / "b.png"]


def link_to_nothing(folder):
    os.symlink(folder / "gone.jpg", folder / "gone.png")
    return [folder / "gone.png"]


REFUSED = "not a regular file, and only regular files are read as images; replace it with an image file, or remove it"
TOO_LARGE = ("more than the 64 megapixels (8000 x 8000) fastnet decodes, so its pixels are not read; resize it, or "
             "replace it with a smaller image")
# Files made to hurt, each with the message it must get: {case: (make it in a folder: its paths, message)}.
HOSTILE = {
    "decompression bomb": (lambda folder: [declaring_png(folder / "bomb.png", 50_000, 50_000)],
                           f"its header declares {TOO_LARGE}"),
    "over Pillow's warning": (lambda folder: [declaring_png(folder / "big.png", 10_000, 10_000)],
                              f"its header declares 10000 x 10000 pixels, {TOO_LARGE}"),
    "named pipe": (named_pipe, f"a named pipe (FIFO), {REFUSED}"),
    "link to a device": (link_to_a_device, f"a symbolic link to /dev/zero, which is a character device, {REFUSED}"),
    "2 GiB file": (lambda folder: [sparse_file(folder / "huge.png", 2**31, head=(folder / "a-good.png").read_bytes())],
                   ("a file of 2.0 GiB, larger than any image fastnet decodes needs (1 GiB at most), so it is not "
                    "read; replace it with an image file, or remove it")),
    "links in a loop": (links_in_a_loop, ("a symbolic link that loops (following it leads back to it); fix or "
                                          "remove the link")),
    "link to nothing": (link_to_nothing, ("a symbolic link to {folder}/gone.jpg, which does not exist; fix or "
                                          "remove the link")),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_file_among_images_gets_one_line_and_the_others_are_classified(case, tiny_model, tmp_path):
    """At once and in little memory: a command that hangs or takes the machine's memory fails the test."""
    folder = tmp_path / "photos"
    folder.mkdir()
    good = [save_image(folder / "a-good.png", uniform(200)), save_image(folder / "z-good.jpg", uniform(40))]
    make, message = HOSTILE[case]
    hostile = make(folder)
    result = run_fastnet("predict", tiny_model, folder, timeout=120, memory=2**30)
    assert result.returncode == 1, result.stderr
    expected = message.replace("{folder}", str(folder))
    assert result.stderr.splitlines() == [f"fastnet: error: {path}: {expected}" for path in hostile]
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == list(map(str, good))


def test_csv_gives_the_json_classes_and_probabilities(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    nested_tree(folder)
    table = tmp_path / "out" / "predictions.csv"
    table.parent.mkdir()
    as_json = run_fastnet("predict", tiny_model, folder, "--json", "--top", 2)
    result = run_fastnet("predict", tiny_model, folder, "--csv", table, "--top", 2)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6  # the lines are still printed
    assert os.listdir(table.parent) == ["predictions.csv"]  # no temporary file left
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["path", "class", "probability", "class_2", "probability_2", "error"]
    entries = json.loads(as_json.stdout)["predictions"]
    assert [row["path"] for row in rows] == [entry["file"] for entry in entries]
    for row, entry in zip(rows, entries, strict=True):
        assert [row["class"], row["class_2"]] == [item["class"] for item in entry["top"]]
        assert [float(row["probability"]), float(row["probability_2"])] == [item["probability"]
                                                                            for item in entry["top"]]
        assert row["error"] == ""


def test_csv_top_is_capped_at_the_number_of_classes(tiny_model, tmp_path):
    image = save_image(tmp_path / "a.png", uniform(40))
    table = tmp_path / "p.csv"
    assert run_fastnet("predict", tiny_model, image, "--csv", table, "--top", 9).returncode == 0
    header = table.read_text().splitlines()[0]
    assert header == "path,class,probability,class_2,probability_2,class_3,probability_3,error"


def test_csv_gives_a_broken_image_an_error_row_and_status_1(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    save_image(folder / "a.png", uniform(40))
    (folder / "b.png").write_bytes(b"this is not a picture")
    save_image(folder / "c.png", uniform(200))
    table = tmp_path / "p.csv"
    result = run_fastnet("predict", tiny_model, folder, "--csv", table)
    assert result.returncode == 1
    assert result.stderr.count("fastnet: error: ") == 1 and "b.png" in result.stderr
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(folder / name) for name in ("a.png", "b.png", "c.png")]
    assert rows[1]["error"].startswith(f"{folder / 'b.png'}: ") and rows[1]["class"] == ""
    assert rows[0]["error"] == rows[2]["error"] == "" and rows[0]["class"] == "dark"


def test_csv_is_never_half_written(tmp_path):
    from fastnet.predict import CsvWriter
    table = tmp_path / "p.csv"
    table.write_text("an older table, kept as it was\n")
    writer = CsvWriter(table, 3, 3)
    writer.write("a.png", [(0, "dark", 0.5)], None)
    writer.abort()  # what an interrupted or failed run does
    assert table.read_text() == "an older table, kept as it was\n"
    assert os.listdir(tmp_path) == ["p.csv"]


def test_an_interrupted_run_leaves_no_csv(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"{i:04d}-{'long name ' * 10}.png" for i in range(1000)]
    for i, name in enumerate(names):
        save_image(folder / name, uniform(i % 256))
    table = tmp_path / "out" / "p.csv"
    table.parent.mkdir()
    # Its stdout is read one line, and then not until it is stopped: the run waits to print once the
    # pipe is full (64 KiB, a few hundred of its 1000 long lines), so it is stopped with its table begun.
    process = start_fastnet("predict", tiny_model, folder, "--csv", table)
    try:
        assert process.stdout.readline().startswith(f"{folder / names[0]}: ")
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert os.listdir(table.parent) == []


def test_grey_and_transparent_images_are_converted_like_a_viewer_shows_them(tiny_model, tmp_path):
    grey = save_image(tmp_path / "grey.png", np.full((4, 4), 90))
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black: shown as white
    see_through = save_image(tmp_path / "clear.png", rgba)
    result = run_fastnet("predict", tiny_model, grey, see_through, "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["predictions"]
    assert_scored_as(entries, tiny_model, [uniform(90), uniform(255)])
    assert entries[1]["top"][0]["class"] == "bright"


def test_a_bigger_image_is_resized_to_the_model_input(tiny_model, tmp_path):
    big = save_image(tmp_path / "big.png", uniform(180, size=40))
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (90, 30), (30, 30, 30)).save(wide, quality=100)
    result = run_fastnet("predict", tiny_model, big, wide, "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["predictions"]
    # A uniform picture stays uniform when resized, so it must score as the small one does.
    assert_scored_as(entries, tiny_model, [uniform(180), uniform(30)])


@pytest.mark.parametrize("make_args, phrases", [
    (lambda model, folder: ["/no/such/model.npz", folder], ["does not exist"]),
    (lambda model, folder: [model, folder, "--top", 0], ["--top", "not positive"]),
    (lambda model, folder: [model, folder / "empty"], ["no image files", "empty"]),
    (lambda model, folder: [model, folder / "empty"], ["no image files in", "or its subfolders"]),
    (lambda model, folder: [model, folder / "x.png", "--csv", folder / "x.png" / "out.csv"],
     ["cannot write --csv", "x.png/out.csv", "pass a path in a folder you can write to"]),
    (lambda model, folder: [model, folder / "x.png", "--csv", folder / "no" / "such" / "out.csv"],
     ["cannot write --csv", "pass a path in a folder you can write to"]),
    (lambda model, folder: [model], ["required", "IMAGE"]),
])
def test_bad_arguments_get_one_line_and_status_2(make_args, phrases, tmp_path):
    model = tmp_path / "model.npz"
    net = MLP([48, 4, 3], seed=0)
    checkpoint.save(model, net, [0.5] * 3, [0.25] * 3, (4, 4, 3), NAMES, {})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    (tmp_path / "empty" / "deeper").mkdir()
    (tmp_path / "empty" / "deeper" / "notes.txt").write_text("nor here")
    (tmp_path / "nested" / "photos").mkdir(parents=True)
    save_image(tmp_path / "nested" / "photos" / "cat.png", uniform(10))
    save_image(tmp_path / "x.png", uniform(10))
    assert_one_line_error(run_fastnet("predict", *make_args(model, tmp_path)), *phrases)


def test_a_model_of_flat_vectors_that_no_picture_fits_is_refused(tmp_path):
    model = tmp_path / "model.npz"
    checkpoint.save(model, MLP([10, 4, 2], seed=0), [0.5], [0.25], (10,), ["a", "b"], {})
    save_image(tmp_path / "x.png", uniform(10))
    assert_one_line_error(run_fastnet("predict", model, tmp_path / "x.png"), "(10,)", "fastnet.load")


# --- The Python API -------------------------------------------------------------------------------

@pytest.fixture
def saved_model(tmp_path):
    """A checkpoint with random weights and made-up statistics: enough to check the arithmetic."""
    path = tmp_path / "model.npz"
    net = MLP([48, 16, 5], seed=3)
    checkpoint.save(path, net, [0.2, 0.5, 0.7], [0.1, 0.2, 0.3], (4, 4, 3), list("abcde"), {"hidden": [16]})
    return path


def test_load_gives_probabilities_and_labels_of_the_evaluate_path(saved_model):
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3)).astype(np.uint8)
    model = fastnet.load(saved_model)
    probabilities = model.predict_proba(images)
    assert probabilities.shape == (7, 5) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    predictions, logits = evaluate_path(saved_model, images)
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=1e-5, atol=1e-7)
    assert model.predict(images).tolist() == predictions.tolist()
    assert model.class_names == list("abcde")


def test_load_takes_one_image_floats_and_flat_rows(saved_model):
    images = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3)).astype(np.uint8)
    model = fastnet.load(saved_model)
    batch = model.predict_proba(images)
    np.testing.assert_allclose(model.predict_proba(images[1]), batch[1:2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.predict_proba(images / 255.0), batch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(images.reshape(3, -1)), batch, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.predict_proba(images.astype(np.int64)), batch, rtol=1e-5, atol=1e-7)
    assert model.predict(images[0]).shape == (1,)


@pytest.mark.parametrize("images, phrase", [
    (np.zeros((2, 5, 5, 3), np.uint8), "do not fit"),
    (np.zeros((2, 4, 4), np.uint8), "do not fit"),
    (np.full((1, 4, 4, 3), 2.0), "not [0, 1]"),
    (np.full((1, 4, 4, 3), 300), "not 0-255"),
    (np.full((1, 4, 4, 3), np.nan), "NaN"),
])
def test_load_refuses_images_it_cannot_read_right(saved_model, images, phrase):
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        fastnet.load(saved_model).predict_proba(images)


def test_softmax_is_stable_and_top_k_orders_ties_by_index():
    probabilities = softmax(np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]]))
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)
    indices, values = top_k(probabilities, 5)
    assert indices.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert values[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("shape, expected", [
    ((32, 32, 3), ("RGB", (32, 32))),
    ((20, 30, 1), ("L", (30, 20))),
    ((28, 28), ("L", (28, 28))),
    ((784,), ("L", (28, 28))),
    ((3072,), ("RGB", (32, 32))),
    ((10,), None),
    ((4, 4, 2), None),
])
def test_image_geometry_maps_sample_shapes_to_pictures(shape, expected):
    geometry = image_geometry(shape)
    assert (geometry[:2] if geometry else None) == expected


def test_importing_fastnet_leaves_pillow_alone():
    code = ("import sys, fastnet; assert callable(fastnet.load); "
            "print('PIL' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# --- Real images ----------------------------------------------------------------------------------

@pytest.mark.cifar
def test_predict_on_real_cifar_pngs_agrees_with_evaluate(cifar, cifar_subset, tmp_path):
    run = tmp_path / "run"
    trained = run_fastnet("train", "--data", cifar_subset, "--epochs", 1, "--hidden", 32, "--out", run)
    assert trained.returncode == 0, trained.stderr
    images, labels = cifar.test_images[:24], cifar.test_labels[:24]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, pixels in enumerate(images):
        save_image(folder / f"{i:02d}-{cifar.class_names[labels[i]]}.png", pixels)

    result = run_fastnet("predict", run / "model.npz", folder, "--top", 3, "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["predictions"]
    assert len(entries) == 24
    predictions, logits = evaluate_path(run / "model.npz", images)
    assert [entry["top"][0]["index"] for entry in entries] == predictions.tolist()
    expected = softmax(logits)
    names = fastnet.load(run / "model.npz").class_names
    for entry, row in zip(entries, expected, strict=True):
        assert entry["top"][0]["class"] == names[int(np.argmax(row))]
        for item in entry["top"]:
            assert item["probability"] == pytest.approx(float(row[item["index"]]), rel=1e-5, abs=1e-7)


def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    from fastnet.predict import read_image

    stored = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)  # one row: black, white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left pixel ends up on top
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = read_image(str(path), (2, 1, 3))
    assert upright[:, 0, 0].tolist() == [0, 255]
