"""fastnet export, judged by ONNX Runtime: the exported graph, given the uint8 images a deployed model
receives, gives the probabilities and the classes that fastnet.load(...).predict_proba and .predict
give, for every kind of model fastnet trains; and every bad input is one line."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest

import fastnet
from fastnet import checkpoint, onnx_export
from fastnet.config import TrainConfig
from fastnet.errors import FastnetError
from fastnet.model import MLP
from fastnet.onnx_export import Preprocessing, graph_for
from fastnet.predict import softmax
from fastnet.train import train
from helpers import assert_one_line_error, save_brightness_classes
from helpers import fastnet as run_fastnet

TOLERANCE = 1e-5  # on probabilities in [0, 1], float32: ORT and NumPy differ in the last bits of sums and tanh
NAMES = ["dark", "mid", "bright"]


def quiet_train(data, out, **settings):
    settings = {"epochs": 2, "hidden": (16, 8), "batch_size": 32, "lr": 0.02} | settings
    return train(TrainConfig(data=str(data), out=str(out), **settings), log=lambda line: None)


def classes_of_brightness(folder, shape, counts=None, seed=0):
    """A learnable 3-class npy dataset of uint8 samples of `shape`: a class is a brightness level
    under noise. Its classes are named."""
    folder = pathlib.Path(folder)
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (counts or {"train": 240, "test": 60}).items():
        labels = rng.integers(0, 3, count)
        levels = labels.reshape(-1, *[1] * len(shape)) * 70 + 50
        images = np.clip(levels + rng.normal(0, 40, (count, *shape)), 0, 255).astype(np.uint8)
        np.save(folder / f"{split}_images.npy", images)
        np.save(folder / f"{split}_labels.npy", labels)
    (folder / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    return folder


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """4x4 RGB images, 3 classes."""
    folder = tmp_path_factory.mktemp("colour")
    save_brightness_classes(folder, np.random.default_rng(0), {"train": 300, "test": 90}, side=4, step=80,
                            base=40, noise=40)
    (folder / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    return folder


def images_for(sample_shape, data=None, count=40, seed=1):
    """Images to compare on: the data set's test images when given, and uniform noise, which is far from
    every class and so gives probabilities that are not all 0 or 1."""
    noise = np.random.default_rng(seed).integers(0, 256, (count, *sample_shape), dtype=np.uint8)
    if data is None:
        return noise
    return np.concatenate([np.load(pathlib.Path(data) / "test_images.npy"), noise])


def run_graph(path, images):
    """{output name: array} of the ONNX file at `path` run by ONNX Runtime on `images`."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images}), strict=True))


def assert_same_as_fastnet(run, images, tta="run", to=None):
    """Export `run` with the top class, run the file in ONNX Runtime, and compare with fastnet.load;
    returns ORT's probabilities."""
    to = to or pathlib.Path(run) / "judged.onnx"
    onnx_export.export(run, to, tta=tta, top_class=True)
    onnx.checker.check_model(onnx.load(str(to)))
    got = run_graph(to, images)
    model = fastnet.load(run, tta=tta)
    expected = model.predict_proba(images)
    assert got["probabilities"].dtype == np.float32 and got["probabilities"].shape == expected.shape
    np.testing.assert_allclose(got["probabilities"], expected, rtol=0, atol=TOLERANCE)
    assert got["top_class"].dtype == np.int64
    np.testing.assert_array_equal(got["top_class"], model.predict(images))
    # Not a comparison of two saturated outputs: some rows are uncertain, where any mistake shows.
    assert expected.max(axis=1).min() < 0.9
    return got["probabilities"]


# --- Every kind of model -------------------------------------------------------------------------------

MODELS = {
    "relu": {},
    "leaky_relu": {"activation": "leaky_relu"},
    "tanh": {"activation": "tanh"},
    "gelu": {"activation": "gelu"},
    "relu-layernorm": {"norm": "layernorm"},
    "leaky_relu-layernorm": {"activation": "leaky_relu", "norm": "layernorm"},
    "tanh-layernorm": {"activation": "tanh", "norm": "layernorm"},
    "gelu-layernorm": {"activation": "gelu", "norm": "layernorm"},
    "pca": {"pca": 12},
    "pca-whiten": {"pca": 12, "whiten": True},
    "pca-whiten-flip-tta": {"pca": 12, "whiten": True, "flip": True, "tta": "flip", "activation": "gelu",
                            "norm": "layernorm", "dropout": 0.1},
    "tta-flip": {"tta": "flip"},
    "tta-flip-shift": {"flip": True, "translate": 1, "tta": "flip+shift"},
    "pca-whiten-translate-flip-shift-tta": {"pca": 12, "whiten": True, "translate": 1, "tta": "flip+shift"},
    "float64": {"dtype": "float64", "norm": "layernorm"},
}


@pytest.mark.parametrize("settings", MODELS.values(), ids=MODELS.keys())
def test_onnx_runtime_gives_fastnets_probabilities(settings, colour, tmp_path):
    quiet_train(colour, tmp_path, **settings)
    assert_same_as_fastnet(tmp_path, images_for((4, 4, 3), colour))


def test_a_bf16_trained_model(colour, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNET_BF16_ANY_CPU", "1")
    quiet_train(colour, tmp_path, precision="bf16", activation="gelu", norm="layernorm")
    assert checkpoint.load(str(tmp_path)).config["precision"] == "bf16"
    assert_same_as_fastnet(tmp_path, images_for((4, 4, 3), colour))


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8), (64,)], ids=["28x28x1", "8x8", "flat-64"])
def test_other_shapes_of_images(shape, tmp_path):
    data = classes_of_brightness(tmp_path / "data", shape)
    quiet_train(data, tmp_path / "run", pca=10 if shape == (28, 28, 1) else 0)
    images = images_for(shape, data)
    assert_same_as_fastnet(tmp_path / "run", images, tta=None)
    if len(shape) > 1:  # a flat sample cannot be mirrored: see test_flip_of_flat_samples_is_refused
        assert_same_as_fastnet(tmp_path / "run", images, tta="flip")
        assert_same_as_fastnet(tmp_path / "run", images, tta="flip+shift")
    graph = onnx.load(str(tmp_path / "run" / "judged.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", *shape]


def test_the_flip_is_in_the_graph_whichever_the_run_used(colour, tmp_path):
    """--tta none on a run evaluated with flips, and flip on one evaluated without: each graph is
    fastnet's with that choice, and the two choices do differ on these images."""
    quiet_train(colour, tmp_path / "flipped", tta="flip")
    quiet_train(colour, tmp_path / "plain")
    images = images_for((4, 4, 3), colour)
    for run in ("flipped", "plain"):
        with_flip = assert_same_as_fastnet(tmp_path / run, images, tta="flip")
        without = assert_same_as_fastnet(tmp_path / run, images, tta=None)
        assert np.abs(with_flip - without).max() > 100 * TOLERANCE
        assert_same_as_fastnet(tmp_path / run, images)  # the run's own choice
    onnx_export.export(tmp_path / "flipped", tmp_path / "default.onnx")
    properties = {p.key: p.value for p in onnx.load(str(tmp_path / "default.onnx")).metadata_props}
    assert json.loads(properties["tta"]) == "flip"


def test_the_shifts_are_in_the_graph_whichever_the_run_used(colour, tmp_path):
    """--tta flip+shift on a run evaluated with flips, and flip on one evaluated with flip+shift: each
    graph is fastnet's with that choice; the 10 views are one mirror Slice, one Pad of each of the two
    images and a Slice window of it per shift, and the command says what it averaged."""
    quiet_train(colour, tmp_path / "flipped", tta="flip")
    quiet_train(colour, tmp_path / "shifted", flip=True, translate=1, tta="flip+shift")
    images = images_for((4, 4, 3), colour)
    for run in ("flipped", "shifted"):
        shifted = assert_same_as_fastnet(tmp_path / run, images, tta="flip+shift")
        flipped = assert_same_as_fastnet(tmp_path / run, images, tta="flip")
        assert np.abs(shifted - flipped).max() > 100 * TOLERANCE
    result = run_fastnet("export", tmp_path / "shifted", "--to", tmp_path / "default.onnx")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(" out, each averaged over 10 views: it and its mirror image, as they are and "
                                  "shifted a pixel up, down, left and right\n")
    model = onnx.load(str(tmp_path / "default.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}["tta"]) == "flip+shift"
    operators = [node.op_type for node in model.graph.node]
    assert (operators.count("Pad"), operators.count("Slice"), operators.count("Softmax")) == (2, 1 + 8, 1)


def test_any_batch_size(colour, tmp_path):
    quiet_train(colour, tmp_path, tta="flip")
    onnx_export.export(tmp_path, tmp_path / "model.onnx", top_class=True)
    model = fastnet.load(tmp_path)
    for count in (1, 3, 257):
        images = images_for((4, 4, 3), count=count, seed=count)
        got = run_graph(tmp_path / "model.onnx", images)
        assert got["probabilities"].shape == (count, 3) and got["top_class"].shape == (count,)
        np.testing.assert_allclose(got["probabilities"], model.predict_proba(images), rtol=0, atol=TOLERANCE)
    empty = run_graph(tmp_path / "model.onnx", np.zeros((0, 4, 4, 3), np.uint8))
    assert empty["probabilities"].shape == (0, 3) and empty["top_class"].shape == (0,)


def test_equal_logits_go_to_the_lower_class_as_in_numpy():
    net = MLP([3, 4, 5], seed=0)
    net.params[2][...] = 0  # the last layer's weights: every row's logits are its biases
    net.params[3][...] = [0, 2, 1, 2, 2]
    session = onnxruntime.InferenceSession(graph_for(net, input="float", top_class=True).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert list(net.predict(x)) == [1] * 6
    assert list(session.run(["top_class"], {"features": x})[0]) == [1] * 6


def test_without_top_class_the_probabilities_are_the_only_output(colour, tmp_path):
    quiet_train(colour, tmp_path)
    onnx_export.export(tmp_path, tmp_path / "model.onnx")
    assert list(run_graph(tmp_path / "model.onnx", images_for((4, 4, 3), count=2))) == ["probabilities"]


def test_the_metadata_names_the_classes_and_the_run(colour, tmp_path):
    quiet_train(colour, tmp_path, activation="tanh", norm="layernorm", pca=12, whiten=True)
    onnx_export.export(tmp_path, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)  # full_check infers every shape too
    assert [(o.domain, o.version) for o in model.opset_import] == [("", onnx_export.OPSET)]
    properties = {p.key: p.value for p in model.metadata_props}
    assert json.loads(properties["class_names"]) == NAMES
    assert properties["fastnet_version"] == fastnet.__version__ == model.producer_version
    config = json.loads(properties["config"])
    assert config["activation"] == "tanh" and config["norm"] == "layernorm" and config["pca"] == 12
    assert config["whiten"] is True and config["hidden"] == [16, 8] and "data" not in config
    assert json.loads(properties["sizes"]) == [12, 16, 8, 3]
    assert json.loads(properties["sample_shape"]) == [4, 4, 3]


# --- The pieces, for a network that never was a run ----------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "gelu"])
def test_a_float_input_graph_from_the_pieces(activation, tmp_path):
    rng = np.random.default_rng(3)
    net = MLP([6, 9, 7, 4], activation=activation, norm="layernorm", seed=1)
    for p in net.params:  # gains and biases of layer norm away from 1 and 0
        p += rng.normal(0, 0.3, p.shape).astype(p.dtype)
    shift = rng.normal(0, 1, 8).astype(np.float32)
    scale = rng.uniform(0.5, 2, 8).astype(np.float32)
    projection = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    x = rng.normal(0, 2, (50, 8)).astype(np.float32)

    model = graph_for(net, Preprocessing(shift, scale, projection), input="float", top_class=True,
                      class_names="abcd")
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, top = session.run(None, {"features": x})
    logits = net.forward(((x - shift) * scale) @ projection)
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(top, logits.argmax(axis=1))

    bare = graph_for(net, input="float")  # no preprocessing: the network alone
    session = onnxruntime.InferenceSession(bare.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = rng.normal(0, 1, (5, 6)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"features": rows})[0], softmax(net.forward(rows)), rtol=0,
                               atol=TOLERANCE)


def test_the_pieces_refuse_what_they_cannot_build():
    net = MLP([12, 3])
    with pytest.raises(ValueError, match="features"):
        graph_for(net, input="uint8-images", sample_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="mirrors images"):
        graph_for(net, input="float", tta="flip")
    with pytest.raises(ValueError, match="mirrors images"):
        graph_for(net, input="uint8-images", sample_shape=(12,), tta="flip")
    with pytest.raises(ValueError, match="tta flip\\+shift mirrors and shifts images"):
        graph_for(net, input="float", tta="flip+shift")
    with pytest.raises(ValueError, match="tta flip\\+shift mirrors and shifts images, but these samples have shape"):
        graph_for(net, input="uint8-images", sample_shape=(12,), tta="flip+shift")
    with pytest.raises(ValueError, match="not one of"):
        graph_for(net, input="pixels")
    with pytest.raises(ValueError, match="not a test-time augmentation"):
        graph_for(net, input="uint8-images", sample_shape=(2, 2, 3), tta="rotate")


# --- The command ---------------------------------------------------------------------------------------

def test_the_command_writes_what_it_says(colour, tmp_path):
    run = tmp_path / "run"
    quiet_train(colour, run, tta="flip")
    result = run_fastnet("export", run, "--top-class")
    assert result.returncode == 0, result.stderr
    written = run / "model.onnx"  # without --to: beside the model
    assert result.stdout == (f"wrote {written}: images uint8 (N, 4, 4, 3) in, probabilities float32 (N, 3) and "
                             "top_class int64 (N,) out, each averaged with its mirror image\n")
    images = images_for((4, 4, 3), colour)
    np.testing.assert_allclose(run_graph(written, images)["probabilities"], fastnet.load(run).predict_proba(images),
                               rtol=0, atol=TOLERANCE)

    result = run_fastnet("export", run / "model.npz", "--to", tmp_path / "plain.onnx", "--tta", "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path / 'plain.onnx'}: images uint8 (N, 4, 4, 3) in, probabilities float32 " \
                            "(N, 3) out\n"
    np.testing.assert_allclose(run_graph(tmp_path / "plain.onnx", images)["probabilities"],
                               fastnet.load(run, tta=None).predict_proba(images), rtol=0, atol=TOLERANCE)


def test_the_best_recipes_model_runs(tmp_path):
    """--recipe best's architecture (512 whitened components, 2048-2048, GELU, layer norm, flips and shifts
    at test time), trained for one epoch on small images so that it takes seconds."""
    data = classes_of_brightness(tmp_path / "data", (16, 16, 3), counts={"train": 600, "test": 100})
    run = tmp_path / "run"
    trained = run_fastnet("train", "--data", data, "--recipe", "best", "--epochs", 1, "--backend", "numpy",
                          "--out", run)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["sizes"] == [512, 2048, 2048, 3] and config["activation"] == "gelu"
    assert config["tta"] == "flip+shift"
    exported = run_fastnet("export", run, "--to", tmp_path / "best.onnx", "--top-class")
    assert exported.returncode == 0, exported.stderr
    images = images_for((16, 16, 3), data)
    assert_same_as_fastnet(run, images, to=tmp_path / "best.onnx")


@pytest.mark.cifar
def test_top1_on_the_real_cifar10_test_set_is_fastnets_image_for_image(cifar, cifar_subset, tmp_path):
    trained = run_fastnet("train", "--data", cifar_subset, "--epochs", 1, "--hidden", 64, "--flip", "--tta", "flip",
                          "--out", tmp_path)
    assert trained.returncode == 0, trained.stderr
    onnx_export.export(tmp_path, tmp_path / "model.onnx", top_class=True)
    images = cifar.test_images  # all 10,000
    got = run_graph(tmp_path / "model.onnx", images)
    model = fastnet.load(tmp_path)
    predictions = model.predict(images)
    np.testing.assert_array_equal(got["top_class"], predictions)
    np.testing.assert_array_equal(got["probabilities"].argmax(axis=1), predictions)
    np.testing.assert_allclose(got["probabilities"], model.predict_proba(images), rtol=0, atol=TOLERANCE)
    assert np.mean(predictions == cifar.test_labels) > 0.2  # a trained model, not chance (10 %)


# --- Bad input: one line, exit status 2, nothing written -------------------------------------------------

def test_a_run_folder_without_a_model(tmp_path):
    assert_one_line_error(run_fastnet("export", tmp_path), "without a model.npz")
    assert os.listdir(tmp_path) == []


def test_a_model_that_does_not_exist(tmp_path):
    assert_one_line_error(run_fastnet("export", tmp_path / "nothing", "--to", tmp_path / "x.onnx"), "does not exist")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def small_run(colour, tmp_path_factory):
    run = tmp_path_factory.mktemp("small-run")
    quiet_train(colour, run, epochs=1, hidden=(8,))
    return run


@pytest.mark.parametrize("where", ["missing-folder", "under-a-file", "a-folder"])
def test_a_destination_that_cannot_be_written(where, small_run, tmp_path):
    (tmp_path / "file").write_text("a file")
    to = {"missing-folder": tmp_path / "missing" / "m.onnx", "under-a-file": tmp_path / "file" / "m.onnx",
          "a-folder": tmp_path}[where]
    assert_one_line_error(run_fastnet("export", small_run, "--to", to), f"--to {to}")
    assert os.listdir(tmp_path) == ["file"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(small_run, tmp_path, monkeypatch):
    to = tmp_path / "model.onnx"
    to.write_bytes(b"the previous export")

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(FastnetError, match="No space left on device"):
        onnx_export.export(small_run, to)
    assert to.read_bytes() == b"the previous export"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_without_the_onnx_package(small_run, tmp_path):
    """A Python without onnx, as far as fastnet can tell: the import fails as it would."""
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from fastnet.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "export", str(small_run), "--to", str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "needs the onnx package", "pip install 'fastnet[onnx]'")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tta, phrase", [("flip", "--tta flip mirrors images"),
                                         ("flip+shift", "--tta flip+shift mirrors and shifts images")])
def test_flip_of_flat_samples_is_refused(tta, phrase, tmp_path):
    data = classes_of_brightness(tmp_path / "data", (64,))
    quiet_train(data, tmp_path / "run", epochs=1)
    result = run_fastnet("export", tmp_path / "run", "--tta", tta, "--to", tmp_path / "m.onnx")
    assert_one_line_error(result, phrase, "this model takes samples of shape (64,)", "--tta none")
    assert not (tmp_path / "m.onnx").exists()


def test_a_tta_that_does_not_exist(small_run, tmp_path):
    result = run_fastnet("export", small_run, "--tta", "rotate", "--to", tmp_path / "m.onnx")
    assert_one_line_error(result, "--tta 'rotate'", "choose flip, flip+shift or none")
    assert os.listdir(tmp_path) == []
