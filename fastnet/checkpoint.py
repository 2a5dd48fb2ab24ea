"""Saving and loading models as .npz files that need no pickle to read.

A checkpoint holds the parameters (`param_0`, `param_1`, ... in the order of `MLP.params`), the
preprocessing statistics, the class names, the configuration as JSON, and optionally optimizer state
and anything else the trainer adds. It is written atomically (fastnet.storage), so a reader never
sees half a file.

It also holds its format (FORMAT) and the version of fastnet that wrote it (files from before fastnet
0.1.0 recorded it have none). A file is read only in this fastnet's format and only when every array
fits the others and the configuration keeps the rules of fastnet.settings; any other file, from
another version or edited since, is refused with one line that names the version that wrote it.
"""

import itertools
import json
import math
import os
import zipfile

import numpy as np

from fastnet import __version__, storage
from fastnet.config import TrainConfig
from fastnet.errors import CheckpointError, SettingError
from fastnet.model import MLP, check_settings

FORMAT = "fastnet-checkpoint-1"
FORMAT_PREFIX, FORMAT_NUMBER = FORMAT.rsplit("-", 1)
VERSION = "fastnet_version"  # the array that holds the version of fastnet that wrote a file
FIRST_VERSIONED = "0.1.0"  # the first fastnet whose files record it
MODEL = "model.npz"  # in a run folder: the model to evaluate and predict with (see fastnet.train)


def save(path, net, mean, std, sample_shape, class_names, config, extra=None, projection=None):
    """Write `net` and what it needs to classify raw images to `path` atomically. A `net` trained on
    projected inputs (fastnet train --pca) is saved as it is, with its `projection`; load() folds the
    two into one network on raw inputs."""
    arrays = {f"param_{i}": p for i, p in enumerate(net.params)}
    if projection is not None:
        arrays["input_projection"] = projection
    arrays.update(
        format=np.array(FORMAT),
        fastnet_version=np.array(__version__),
        sizes=np.array(net.sizes, np.int64),
        spec=np.array(json.dumps(net.spec(), sort_keys=True)),  # activation, norm, dropout
        mean=np.asarray(mean, np.float32),
        std=np.asarray(std, np.float32),
        sample_shape=np.array(sample_shape, np.int64),
        class_names=np.array(list(class_names), dtype=str),
        config=np.array(json.dumps(config, sort_keys=True)),
    )
    arrays.update(extra or {})
    storage.write_atomically(path, lambda f: np.savez(f, **arrays))


class Checkpoint:
    """A loaded checkpoint: the model and what came with it.

    net classifies raw inputs. For a run trained on projected inputs, trained_net is the network as
    it was trained (what a resumed run continues) and projection the matrix that net folds in; for
    any other run, trained_net is net and projection None.
    """

    def __init__(self, net, mean, std, sample_shape, class_names, config, arrays, trained_net=None,
                 projection=None, writer=f"fastnet {__version__}"):
        self.net = net
        self.trained_net = trained_net or net
        self.projection = projection
        self.mean = mean
        self.std = std
        self.sample_shape = sample_shape
        self.class_names = class_names
        self.config = config
        self.arrays = arrays
        self.writer = writer  # "fastnet 0.1.0": which fastnet wrote the file, for messages


def model_file(path):
    """The file a model argument names: `path` itself, or for a run folder the model.npz in it."""
    if os.path.isdir(path):
        inside = os.path.join(path, MODEL)
        if not os.path.isfile(inside):
            raise CheckpointError(f"{path} is a folder without a {MODEL}: pass a run folder that fastnet train "
                                  f"wrote (it writes {MODEL} after the first epoch), or a model file")
        return inside
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run folder or the {MODEL} a training "
                              f"run wrote")
    return path


def load(path, backend=None):
    """Read a checkpoint written by save(), from its file or, for a model, from its run folder (see
    model_file); refuses anything that would need pickle, and any file that save() of this fastnet
    would not have written (check_format, and each array against the others)."""
    path = model_file(path)
    arrays = _read(path)
    who = writer(arrays)
    check_format(path, arrays, who)
    try:
        config = _config(arrays)
        net, sample_shape, projection = _network(arrays, backend)
        _check_data_arrays(arrays, sample_shape, net.sizes[-1])
        _require((projection is None) == (not config.get("pca")),
                 f"its config says pca {config.get('pca')!r}, and it {'lacks' if projection is None else 'has'} an "
                 f"input projection")
    except _Altered as exc:
        raise altered(path, who, exc) from exc
    trained_net, net = net, net if projection is None else net.with_input_projection(projection)
    return Checkpoint(net, arrays["mean"], arrays["std"], sample_shape, [str(c) for c in arrays["class_names"]],
                      config, arrays, trained_net, projection, who)


def _read(path):
    """Every array of the .npz file at `path`, without pickle."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip file
                raise CheckpointError(f"{path} is not a fastnet checkpoint (not even an .npz file): pass the "
                                      f"model.npz a training run wrote")
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    except MemoryError as exc:  # a header that claims more than the machine has; the bytes are never read
        raise CheckpointError(f"checkpoint {path} declares an array larger than this machine's memory "
                              f"({first_line(exc)}): if the file is smaller than that, it is truncated or corrupt, "
                              f"so retrain or pass another file; else load it on a machine with more memory") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
            raise CheckpointError(f"{path} holds Python objects that only pickle can load, and pickle can "
                                  f"run code: refused; pass a checkpoint written by fastnet train") from exc
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({first_line(exc)}): it is truncated, corrupt or not "
            f"a fastnet checkpoint; retrain or pass another file") from exc


def version(arrays):
    """The version of fastnet that wrote a checkpoint; None for a file from before versions were
    recorded, and "" for one whose version array was edited into something else than text."""
    found = arrays.get(VERSION)
    if found is None:
        return None
    return str(found) if found.shape == () and found.dtype.kind == "U" else ""


def writer(arrays):
    """Which fastnet wrote a checkpoint, for messages: "fastnet 0.2.0", or for a file without a
    version "a fastnet older than 0.1.0"."""
    found = version(arrays)
    if found is None:
        return f"a fastnet older than {FIRST_VERSIONED}"
    return f"fastnet {found}" if found else "a fastnet whose version the file no longer says"


def check_format(path, arrays, who):
    """CheckpointError unless the file is in this fastnet's FORMAT: not a fastnet checkpoint at all,
    one in another format (from an older or a newer fastnet), or one whose format was edited."""
    marker = arrays.get("format")
    text = str(marker) if marker is not None and marker.shape == () and marker.dtype.kind == "U" else None
    if text == FORMAT:
        return
    prefix, _, number = (text or "").rpartition("-")
    if prefix != FORMAT_PREFIX and not {"config", "sizes", "param_0"} <= arrays.keys():
        raise CheckpointError(f"{path} is not a fastnet checkpoint: pass the model.npz a training run wrote")
    if prefix == FORMAT_PREFIX and number.isdigit() and number != FORMAT_NUMBER:
        newer = int(number) > int(FORMAT_NUMBER)
        other = f"fastnet {version(arrays)}" if version(arrays) else "the fastnet that wrote it"
        advice = f"use {other} to read it" if newer else f"retrain with this fastnet, or read it with {other}"
        raise CheckpointError(f"{path} was written by {who} in checkpoint format {number}, "
                              f"{'newer' if newer else 'older'} than the format {FORMAT_NUMBER} this fastnet "
                              f"{__version__} reads: {advice}")
    found = "is missing" if marker is None else f"says {text!r}" if text else "is not text"
    raise altered(path, who, f"its format field {found}, where fastnet writes {FORMAT!r}")


def altered(path, who, problem):
    """The CheckpointError of a fastnet checkpoint that its writer would not have written: edited, or
    damaged, since."""
    return CheckpointError(f"{path} was written by {who} and altered since: {problem}; retrain, or pass the "
                           f"file as fastnet train wrote it")


class _Altered(Exception):
    """What is wrong with a checkpoint's arrays, in a few words."""


def _require(condition, problem):
    if not condition:
        raise _Altered(problem)


def _array(arrays, name):
    _require(name in arrays, f"it has no {name} array")
    return arrays[name]


def _config(arrays):
    """The run's configuration, refused when it breaks a rule of fastnet.settings."""
    try:
        config = json.loads(str(_array(arrays, "config")))
    except ValueError as exc:
        raise _Altered(f"its config is not JSON ({first_line(exc)})") from exc
    _require(isinstance(config, dict), "its config is not a JSON object")
    fields = {name: config[name] for name in TrainConfig.__dataclass_fields__ if name in config}
    try:
        TrainConfig(**fields).check_rules()
    except SettingError as exc:
        raise _Altered(f"its config sets {exc.setting} to {fields.get(exc.setting)!r}, which no run can use") from exc
    except (TypeError, ValueError) as exc:  # a value of a type no rule expects, such as a number for a list
        raise _Altered(f"its config is malformed ({first_line(exc)})") from exc
    return config


def _network(arrays, backend):
    """(the network the arrays describe with their parameters in it, the sample shape, the input
    projection or None)."""
    sizes = _integers(_array(arrays, "sizes"), "sizes")
    dtype = _array(arrays, "param_0").dtype
    try:
        spec = json.loads(str(arrays["spec"])) if "spec" in arrays else {}  # older files: plain ReLU
    except ValueError as exc:
        raise _Altered(f"its spec is not JSON ({first_line(exc)})") from exc
    _require(isinstance(spec, dict) and spec.keys() <= {"activation", "norm", "dropout"},
             "its spec is not a JSON object of activation, norm and dropout")
    try:
        check_settings(dtype, **spec)
    except SettingError as exc:
        value = str(dtype) if exc.setting == "dtype" else spec.get(exc.setting)
        raise _Altered(f"its network has {exc.setting} {value!r}, which no network of fastnet's has") from exc
    _require(len(sizes) >= 2, f"its sizes {sizes} are not the widths of a network")
    # The parameters the sizes need against those stored, before a network of that size is made: sizes
    # edited to [100000, 100000] would otherwise ask for 40 GB. (Layer norm's gains and biases come on top.)
    needed = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))
    held = sum(array.size for name, array in arrays.items() if name.startswith("param_"))
    _require(needed <= held, f"its sizes {sizes} need {needed} parameters, and it holds {held}")
    net = MLP(sizes, backend=backend, dtype=dtype, **spec)
    for i, p in enumerate(net.params):
        stored = _array(arrays, f"param_{i}")
        _require(stored.shape == p.shape and stored.dtype == p.dtype,
                 f"param_{i} is {stored.dtype} {stored.shape} where its sizes need {p.dtype} {p.shape}")
        p[...] = stored
    sample_shape = tuple(_integers(_array(arrays, "sample_shape"), "sample_shape"))
    inputs = math.prod(sample_shape)
    projection = arrays.get("input_projection")
    if projection is None:
        _require(inputs == sizes[0], f"its sample shape {sample_shape} holds {inputs} values, but its network "
                                     f"takes {sizes[0]} inputs")
    else:
        _require(projection.shape == (inputs, sizes[0]) and projection.dtype == dtype,
                 f"its input projection is {projection.dtype} {projection.shape}, where its sample shape and "
                 f"sizes need {dtype} {(inputs, sizes[0])}")
    return net, sample_shape, projection


def _integers(array, name):
    _require(array.ndim == 1 and array.dtype.kind in "iu" and len(array) > 0 and array.min() >= 1,
             f"its {name} array is not a list of positive integers")
    return [int(v) for v in array]


def _check_data_arrays(arrays, sample_shape, classes):
    """The preprocessing statistics and the class names, against the sample shape and the classes."""
    inputs = math.prod(sample_shape)
    mean, std = _array(arrays, "mean"), _array(arrays, "std")
    _require(mean.ndim == 1 and std.shape == mean.shape and len(mean) > 0 and inputs % len(mean) == 0
             and mean.dtype.kind == std.dtype.kind == "f",
             f"its mean and std, of shapes {mean.shape} and {std.shape}, are not statistics of channels or features "
             f"of {inputs} inputs")
    _require(bool(np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()),
             "its mean or std holds a value that is not finite, or its std one that is not positive")
    names = _array(arrays, "class_names")
    _require(names.ndim == 1 and names.dtype.kind == "U" and len(names) == classes,
             f"it names {names.size} classes, but its network has {classes} outputs")


def first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
