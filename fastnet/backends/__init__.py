"""The backend registry: the only door through which fastnet reaches its kernels.

A backend is a module (or any object) that provides every name in `KERNELS` with the signatures that
`fastnet.backends.numpy_backend`, the reference, defines. The model, optimizers and trainer ask
`get(name)` for one and never import a backend module themselves.
"""

import os

from fastnet.backends import numpy_backend
from fastnet.errors import FastnetError

KERNELS = (
    "gather_normalize",
    "dense_forward",
    "dense_relu_forward",
    "dense_backward",
    "relu_backward",
    "softmax_cross_entropy",
    "count_correct",
    "sgd_step",
    "momentum_step",
    "nesterov_step",
    "adam_step",
    "adamw_step",
)

DEFAULT = "numpy"
_backends = {}


def register(name, backend):
    """Make `backend` available as `name`; it must provide every kernel in KERNELS."""
    missing = [kernel for kernel in KERNELS if not callable(getattr(backend, kernel, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks the kernels {', '.join(missing)}")
    _backends[name] = backend


def available():
    """The names of the registered backends, in registration order."""
    return list(_backends)


def resolve(name=None):
    """The name of the backend that get(name) returns: None means $FASTNET_BACKEND, or the default
    when that is unset."""
    name = name or os.environ.get("FASTNET_BACKEND") or DEFAULT
    if name not in _backends:
        raise FastnetError(f"unknown backend {name!r}: choose one of {', '.join(available())}")
    return name


def get(name=None):
    """The backend called `name` (see resolve)."""
    return _backends[resolve(name)]


register("numpy", numpy_backend)
