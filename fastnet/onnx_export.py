"""fastnet export: a trained model as one ONNX graph, from the pixels a deployed model receives to its
class probabilities, built with the `onnx` package (pip install 'fastnet[onnx]').

The graph does what `fastnet predict` does, operation for operation, so that ONNX Runtime gives the
same probabilities:

    images (N, H, W, C) uint8 -> Cast -> Sub shift -> Mul scale                      standardise
    [--tta: each view of them: Slice, step -1 on W (mirror); Pad with 0, Slice (shift)]
    -> Flatten (N, D) [-> MatMul projection (D, K)]      --pca, whitening in its columns
    per hidden layer: MatMul W -> Add b [-> LayerNormalization] -> activation
    last layer: MatMul W -> Add b                        the logits
    [--tta: the views' logits added in turn, then divided by their number]
    -> Cast double -> Softmax -> Cast float              probabilities (N, classes)
    [ArgMax of the logits                                top_class (N,) int64]

graph_for builds it from the pieces alone (a network, its preprocessing, the kind of input), so that
any model of fastnet's MLP can be exported, from a run's model.npz (model_for, export) or from
arrays that never were one (a float-input graph: input="float").
"""

import dataclasses
import json
import math
import os

import numpy as np

import fastnet
from fastnet import checkpoint, data, predict, storage
from fastnet.activations import LEAKY_RELU_SLOPE
from fastnet.backends.numpy_backend import GELU_CUBIC, GELU_SQRT_2_OVER_PI
from fastnet.errors import FastnetError
from fastnet.evaluation import TTA, TTA_ACTIONS, TTA_VIEWS, normalizer
from fastnet.model import LAYERNORM_EPS

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # an optional extra: the message comes when an export is asked for
    onnx, _MISSING = None, exc.name

# The first opset with LayerNormalization: nothing here needs a later one, and the lowest that serves
# lets older runtimes load the file too.
OPSET = 17
INPUTS = ("uint8-images", "float")
INPUT_NAMES = {"uint8-images": "images", "float": "features"}
PROBABILITIES, TOP_CLASS = "probabilities", "top_class"
# config.json's settings that say what the model is and how it was trained: the model's metadata.
ESSENTIALS = ("recipe", "hidden", "activation", "norm", "dropout", "precision", "dtype", "pca", "whiten", "flip",
              "translate", "cutout", "label_smoothing", "optimizer", "lr", "weight_decay", "schedule", "epochs",
              "batch_size", "seed", "tta")


def require_onnx():
    """The onnx module, or one line that says how to install it."""
    if onnx is None:
        raise FastnetError(f"exporting to ONNX needs the {_MISSING} package, which is not installed: "
                           f"pip install 'fastnet[onnx]'")
    return onnx


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the graph does to its input before the network: (x - shift) * scale per feature (each (D,)
    or None for none), then x @ projection (D, K) when there is one."""

    shift: np.ndarray | None = None
    scale: np.ndarray | None = None
    projection: np.ndarray | None = None


class _Graph:
    """The nodes and initializers of a graph under construction, each named once."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes, self.initializers = [], []
        self._constants = {}

    def constant(self, name, value, dtype=None):
        array = np.asarray(value, dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, value):
        """A scalar of the graph's dtype, one initializer per value however often it is used."""
        key = float(value)
        if key not in self._constants:
            self._constants[key] = self.constant(f"const/{key!r}", key)
        return self._constants[key]

    def op(self, op_type, inputs, output, **attributes):
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output


def _gelu(g, x, at):
    """GELU's tanh form as numpy_backend.gelu_forward computes it, operation for operation, so that
    only tanh's last bit can differ: (0.5 x) (1 + tanh(c (x + k x x x)))."""
    cube = g.op("Mul", [g.op("Mul", [x, x], f"{at}/x2"), x], f"{at}/x3")
    inner = g.op("Add", [x, g.op("Mul", [g.scalar(GELU_CUBIC), cube], f"{at}/kx3")], f"{at}/sum")
    inner = g.op("Mul", [g.scalar(GELU_SQRT_2_OVER_PI), inner], f"{at}/inner")
    one_plus = g.op("Add", [g.scalar(1.0), g.op("Tanh", [inner], f"{at}/tanh")], f"{at}/one_plus")
    return g.op("Mul", [g.op("Mul", [g.scalar(0.5), x], f"{at}/half_x"), one_plus], at)


def _activation(g, name, x, at):
    if name == "relu":
        return g.op("Relu", [x], at)
    if name == "leaky_relu":
        return g.op("LeakyRelu", [x], at, alpha=LEAKY_RELU_SLOPE)
    if name == "tanh":
        return g.op("Tanh", [x], at)
    if name == "gelu":
        return _gelu(g, x, at)
    raise ValueError(f"no ONNX form of the activation {name!r}")


def _parameters(g, net):
    """The initializers of `net` (fastnet.MLP, or anything with its weights, biases, norm_gains,
    norm_biases, activation and norm), stored once however many views of the images use them."""
    last = len(net.weights) - 1
    for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        g.constant(f"layer{i + 1}.weight", W)
        g.constant(f"layer{i + 1}.bias", b)
        if net.norm is not None and i < last:
            g.constant(f"layer{i + 1}.norm_gain", net.norm_gains[i])
            g.constant(f"layer{i + 1}.norm_bias", net.norm_biases[i])


def _network(g, x, net, prefix):
    """The nodes of `net` on input x, named under `prefix`; returns the logits' name."""
    last = len(net.weights) - 1
    for i in range(len(net.weights)):
        layer = f"layer{i + 1}"
        at = f"{prefix}{layer}"
        x = g.op("MatMul", [x, f"{layer}.weight"], f"{at}/matmul")
        x = g.op("Add", [x, f"{layer}.bias"], f"{at}/dense" if i < last else f"{prefix}logits")
        if i == last:
            return x
        if net.norm is not None:
            x = g.op("LayerNormalization", [x, f"{layer}.norm_gain", f"{layer}.norm_bias"], f"{at}/norm",
                     axis=-1, epsilon=LAYERNORM_EPS)
        x = _activation(g, net.activation, x, f"{at}/{net.activation}")
    raise ValueError("a network has at least one layer")


def _standardise(g, x, preprocessing):
    if preprocessing.shift is not None:
        x = g.op("Sub", [x, "preprocess.shift"], "preprocess/shifted")
    if preprocessing.scale is not None:
        x = g.op("Mul", [x, "preprocess.scale"], "preprocess/scaled")
    return x


def _project(g, x, preprocessing, prefix):
    if preprocessing.projection is not None:
        x = g.op("MatMul", [x, "preprocess.projection"], f"{prefix}preprocess/projected")
    return x


def _view_prefix(view):
    """The names of a view's nodes start with this: "" for the image as it is, else e.g. "mirror-up1/"."""
    parts = ["mirror"] if view.flip else []
    if view.dy:
        parts.append(f"down{view.dy}" if view.dy > 0 else f"up{-view.dy}")
    if view.dx:
        parts.append(f"right{view.dx}" if view.dx > 0 else f"left{-view.dx}")
    return "-".join(parts) + "/" if parts else ""


def _views(g, images, shape, tta):
    """{name prefix: node} of each view (fastnet.data.View) of the standardised images (N, H, W[, C])
    that `tta` averages over, in fastnet's order. As augment_gather_normalize makes them: mirrored
    first, then moved, with 0 (the mean pixel, standardised) coming in from beyond the border, which
    is why the views are taken after standardising. The mirror image and the padding are made once."""
    views = data.tta_views(tta)
    if len(views) > 1 and len(shape) not in (2, 3):
        raise ValueError(f"tta {tta} {TTA_ACTIONS[tta]}, but these samples have shape {shape}")
    margin = max(max(abs(view.dy), abs(view.dx)) for view in views)
    mirrored, padded, nodes = {False: images}, {}, {}
    for view in views:
        prefix = _view_prefix(view)
        if view.flip not in mirrored:
            mirrored[True] = g.op("Slice", [images, g.constant("mirror.starts", [-1], np.int64),
                                            g.constant("mirror.ends", [np.iinfo(np.int64).min], np.int64),
                                            g.constant("mirror.axes", [2], np.int64),
                                            g.constant("mirror.steps", [-1], np.int64)], "mirror/images")
        nodes[prefix] = mirrored[view.flip]
        if view.dy or view.dx:
            if view.flip not in padded:
                # Height and width padded by the largest move on both sides: each move is a window of it.
                pads = [0, margin, margin] + [0] * (len(shape) - 2)
                pads = g.constant(f"{'mirror/' if view.flip else ''}pads", pads + pads, np.int64)
                padded[view.flip] = g.op("Pad", [nodes[prefix], pads], f"{'mirror/' if view.flip else ''}padded")
            top, left = margin - view.dy, margin - view.dx
            window = [g.constant(f"{prefix}starts", [top, left], np.int64),
                      g.constant(f"{prefix}ends", [top + shape[0], left + shape[1]], np.int64),
                      g.constant(f"{prefix}axes", [1, 2], np.int64)]
            nodes[prefix] = g.op("Slice", [padded[view.flip], *window], f"{prefix}images")
    return nodes


def graph_for(net, preprocessing=None, input="uint8-images", sample_shape=None, tta=None, top_class=False,
              class_names=None, metadata=None, name="fastnet"):
    """The ONNX model (an onnx.ModelProto, checked) of `net` behind `preprocessing`.

    input "uint8-images": a batch of uint8 images (N, *sample_shape), cast to the network's dtype and
    flattened, as fastnet predict takes them; "float": rows (N, D) of the network's dtype. D is the
    length of shift and scale, or the projection's rows, or the network's inputs. tta "flip" (images
    of shape (H, W, C) or (H, W) only) classifies each image by the mean of its logits and its mirror
    image's, "flip+shift" by the mean over those two each also shifted a pixel each way
    (fastnet.data.tta_views). The output "probabilities" (N, classes) is float32, as fastnet's
    softmax is; top_class adds "top_class" (N,) int64, the argmax of the logits (of their mean with
    tta). class_names and `metadata` (str: str) go into the model's metadata_props.
    """
    require_onnx()
    if input not in INPUTS:
        raise ValueError(f"input {input!r} is not one of {INPUTS}")
    if tta not in TTA:
        raise ValueError(f"tta {tta!r} is not a test-time augmentation: choose 'flip', 'flip+shift' or None")
    preprocessing = preprocessing or Preprocessing()
    g = _Graph(net.weights[0].dtype)
    size = _input_size(net, preprocessing)
    images = input == "uint8-images"
    shape = tuple(sample_shape or (size,)) if images else (size,)
    for key in ("shift", "scale", "projection"):
        value = getattr(preprocessing, key)
        if value is not None:
            # Per pixel and channel, as the images come: standardised before any view is taken of them.
            g.constant(f"preprocess.{key}", value if key == "projection" else np.reshape(value, shape))
    _parameters(g, net)

    if images:
        if math.prod(shape) != size:
            raise ValueError(f"images of shape {shape} have {math.prod(shape)} features, the network {size}")
        source = helper.make_tensor_value_info(INPUT_NAMES[input], TensorProto.UINT8, ["N", *shape])
        standardised = _standardise(g, g.op("Cast", [INPUT_NAMES[input]], "pixels", to=g.elem_type), preprocessing)
        rows = {prefix: g.op("Flatten", [view], f"{prefix}rows", axis=1)
                for prefix, view in _views(g, standardised, shape, tta).items()}
    else:
        if tta is not None:
            raise ValueError(f"tta {tta} {TTA_ACTIONS[tta]}: it needs input='uint8-images' and the images' shape")
        source = helper.make_tensor_value_info(INPUT_NAMES[input], g.elem_type, ["N", size])
        rows = {"": _standardise(g, INPUT_NAMES[input], preprocessing)}

    logits = [_network(g, _project(g, x, preprocessing, prefix), net, prefix) for prefix, x in rows.items()]
    total = logits[0]
    for i, view in enumerate(logits[1:], start=1):  # as fastnet.predict: added in turn, then divided
        total = g.op("Add", [total, view], f"tta/sum{i}")
    logits = g.op("Div", [total, g.scalar(len(logits))], "tta/logits") if len(logits) > 1 else total
    classes = net.weights[-1].shape[1]
    # fastnet.predict.softmax works in float64, so that a row's tiny probabilities keep their digits.
    wide = logits if g.dtype == np.float64 else g.op("Cast", [logits], "logits/double", to=TensorProto.DOUBLE)
    g.op("Cast", [g.op("Softmax", [wide], "softmax/double", axis=-1)], PROBABILITIES, to=TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["N", classes])]
    if top_class:
        g.op("ArgMax", [logits], TOP_CLASS, axis=1, keepdims=0)  # the first of equal maxima, as numpy's argmax
        outputs.append(helper.make_tensor_value_info(TOP_CLASS, TensorProto.INT64, ["N"]))

    graph = helper.make_graph(g.nodes, name, [source], outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="fastnet", producer_version=fastnet.__version__)
    properties = {"fastnet_version": fastnet.__version__, **(metadata or {})}
    if class_names is not None:
        properties["class_names"] = json.dumps(list(class_names))
    helper.set_model_props(model, properties)
    onnx.checker.check_model(model)
    return model


def _input_size(net, preprocessing):
    for array in (preprocessing.shift, preprocessing.scale):
        if array is not None:
            return len(array)
    if preprocessing.projection is not None:
        return preprocessing.projection.shape[0]
    return net.weights[0].shape[0]


def model_for(saved, tta="run", top_class=False):
    """The ONNX model of a loaded checkpoint (fastnet.checkpoint.load) on uint8 images of its sample
    shape, with `tta` as fastnet.load takes it ("run": the run's own)."""
    chosen = predict.Model(saved, tta).tta  # predict's rules: a flat-sample model refuses a tta
    shift, scale = normalizer(saved.mean, saved.std, math.prod(saved.sample_shape), np.uint8, saved.net.dtype)
    config = saved.config
    metadata = {
        "sample_shape": json.dumps(list(saved.sample_shape)),
        "sizes": json.dumps(list(saved.trained_net.sizes)),
        "tta": json.dumps(chosen),
        "config": json.dumps({key: config[key] for key in ESSENTIALS if key in config}, sort_keys=True),
    }
    if "epoch" in saved.arrays:
        metadata["epoch"] = str(int(saved.arrays["epoch"]))
    return graph_for(saved.trained_net, Preprocessing(shift, scale, saved.projection), "uint8-images",
                     saved.sample_shape, chosen, top_class, saved.class_names, metadata)


def default_destination(model_path):
    """Where `fastnet export` writes without --to: model.onnx beside the model.npz."""
    return os.path.join(os.path.dirname(checkpoint.model_file(os.fspath(model_path))), "model.onnx")


def export(model_path, to=None, tta="run", top_class=False):
    """Write the ONNX model of the run folder or model.npz at `model_path` to `to` (default:
    default_destination), under a temporary name renamed when complete. Returns (path, model)."""
    require_onnx()
    saved = checkpoint.load(os.fspath(model_path))
    model = model_for(saved, tta, top_class)
    to = os.fspath(to) if to is not None else default_destination(model_path)
    if os.path.isdir(to):
        raise FastnetError(f"--to {to} is a folder: pass a file name such as {os.path.join(to, 'model.onnx')}")
    try:
        storage.write_atomically(to, lambda f: f.write(model.SerializeToString()))
    except OSError as exc:
        raise FastnetError(f"cannot write --to {to} ({exc.strerror or exc}): pass a path in a folder you can "
                           "write to") from exc
    return to, model


def describe(path, model):
    """The line `fastnet export` prints: what it wrote, what goes in and what comes out."""
    def shown(values):
        parts = []
        for value in values:
            tensor = value.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
            shape = "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"
            parts.append(f"{value.name} {helper.tensor_dtype_to_np_dtype(tensor.elem_type)} {shape}")
        return " and ".join(parts)

    properties = {p.key: p.value for p in model.metadata_props}
    tta = json.loads(properties.get("tta", "null"))
    views = f", {TTA_VIEWS[tta]}" if tta in TTA_VIEWS else ""
    return f"wrote {path}: {shown(model.graph.input)} in, {shown(model.graph.output)} out{views}"
