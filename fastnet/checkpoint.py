"""Saving and loading models as .npz files that need no pickle to read.

A checkpoint holds the parameters (`param_0`, `param_1`, ... in the order of `MLP.params`), the
preprocessing statistics, the class names, the configuration as JSON, and optionally optimizer state
and anything else the trainer adds. It is written to a temporary name, flushed to disk and renamed,
so a reader never sees half a file.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

from fastnet.errors import CheckpointError
from fastnet.model import MLP

FORMAT = "fastnet-checkpoint-1"


def save(path, net, mean, std, sample_shape, class_names, config, extra=None):
    """Write `net` and what it needs to classify raw images to `path` atomically."""
    arrays = {f"param_{i}": p for i, p in enumerate(net.params)}
    arrays.update(
        format=np.array(FORMAT),
        sizes=np.array(net.sizes, np.int64),
        mean=np.asarray(mean, np.float32),
        std=np.asarray(std, np.float32),
        sample_shape=np.array(sample_shape, np.int64),
        class_names=np.array(list(class_names), dtype=str),
        config=np.array(json.dumps(config, sort_keys=True)),
    )
    arrays.update(extra or {})
    write_npz_atomically(path, arrays)


def write_npz_atomically(path, arrays):
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class Checkpoint:
    """A loaded checkpoint: the model and what came with it."""

    def __init__(self, net, mean, std, sample_shape, class_names, config, arrays):
        self.net = net
        self.mean = mean
        self.std = std
        self.sample_shape = sample_shape
        self.class_names = class_names
        self.config = config
        self.arrays = arrays


def load(path, backend=None):
    """Read a checkpoint written by save(); refuses anything that would need pickle."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: pass the model.npz a training run wrote")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({_first_line(exc)}): it is truncated, corrupt or not "
            f"a fastnet checkpoint; retrain or pass another file") from exc
    if str(arrays.get("format", "")) != FORMAT:
        raise CheckpointError(f"{path} is not a fastnet checkpoint: pass the model.npz a training run wrote")
    config = json.loads(str(arrays["config"]))
    sizes = [int(s) for s in arrays["sizes"]]
    dtype = arrays["param_0"].dtype
    net = MLP(sizes, backend=backend, dtype=dtype)
    for i, p in enumerate(net.params):
        stored = arrays[f"param_{i}"]
        if stored.shape != p.shape:
            raise CheckpointError(f"{path} is inconsistent: param_{i} has shape {stored.shape}, "
                                  f"expected {p.shape}; retrain or pass another file")
        p[...] = stored
    return Checkpoint(net, arrays["mean"], arrays["std"], tuple(int(s) for s in arrays["sample_shape"]),
                      [str(c) for c in arrays["class_names"]], config, arrays)


def _first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
