"""Saving and loading models as .npz files that need no pickle to read.

A checkpoint holds the parameters (`param_0`, `param_1`, ... in the order of `MLP.params`), the
preprocessing statistics, the class names, the configuration as JSON, and optionally optimizer state
and anything else the trainer adds. It is written atomically (fastnet.storage), so a reader never
sees half a file.
"""

import json
import math
import os
import zipfile

import numpy as np

from fastnet import storage
from fastnet.errors import CheckpointError
from fastnet.model import MLP

FORMAT = "fastnet-checkpoint-1"
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
                 projection=None):
        self.net = net
        self.trained_net = trained_net or net
        self.projection = projection
        self.mean = mean
        self.std = std
        self.sample_shape = sample_shape
        self.class_names = class_names
        self.config = config
        self.arrays = arrays


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
    model_file); refuses anything that would need pickle."""
    path = model_file(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip file
                raise CheckpointError(f"{path} is not a fastnet checkpoint (not even an .npz file): pass the "
                                      f"model.npz a training run wrote")
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
            raise CheckpointError(f"{path} holds Python objects that only pickle can load, and pickle can "
                                  f"run code: refused; pass a checkpoint written by fastnet train") from exc
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({_first_line(exc)}): it is truncated, corrupt or not "
            f"a fastnet checkpoint; retrain or pass another file") from exc
    if str(arrays.get("format", "")) != FORMAT:
        raise CheckpointError(f"{path} is not a fastnet checkpoint: pass the model.npz a training run wrote")
    try:
        config = json.loads(str(arrays["config"]))
        sizes = [int(s) for s in arrays["sizes"]]
        dtype = arrays["param_0"].dtype
        spec = json.loads(str(arrays["spec"])) if "spec" in arrays else {}  # older files: plain ReLU
        net = MLP(sizes, backend=backend, dtype=dtype, **spec)
        stored_params = [arrays[f"param_{i}"] for i in range(len(net.params))]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is an incomplete fastnet checkpoint ({_first_line(exc)} is missing "
                              f"or malformed): retrain or pass another file") from exc
    for i, (p, stored) in enumerate(zip(net.params, stored_params, strict=True)):
        if stored.shape != p.shape:
            raise CheckpointError(f"{path} is inconsistent: param_{i} has shape {stored.shape}, "
                                  f"expected {p.shape}; retrain or pass another file")
        p[...] = stored
    sample_shape = tuple(int(s) for s in arrays["sample_shape"])
    trained_net, projection = net, arrays.get("input_projection")
    if projection is not None:
        if projection.shape != (math.prod(sample_shape), sizes[0]) or projection.dtype != dtype:
            raise CheckpointError(f"{path} is inconsistent: its input projection has shape {projection.shape}, "
                                  f"expected {(math.prod(sample_shape), sizes[0])}; retrain or pass another file")
        net = trained_net.with_input_projection(projection)
    return Checkpoint(net, arrays["mean"], arrays["std"], sample_shape, [str(c) for c in arrays["class_names"]],
                      config, arrays, trained_net, projection)


def _first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
