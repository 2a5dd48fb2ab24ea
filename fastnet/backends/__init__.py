"""The backend registry: the only door through which fastnet reaches its kernels.

A backend is a module (or any object) that provides every name in `KERNELS` with the signatures and
the return convention that `fastnet.backends.numpy_backend`, the reference, defines. The model,
optimizers and trainer ask `get(name)` for one and never import a backend module themselves.

Besides its kernels, a backend may provide `use_threads(n)`, a context in which its kernels run on n
cores, and `parallelism()`, what config.json records of how they share the cores; `use_threads`
and `parallelism` below fall back to BLAS's threads for a backend that has neither. `bf16_gemm()`
names the library that multiplies its bfloat16 operands, or returns None when it has none; a backend
without it computes them as NumPy's reference does, in float32. `bf16_shortfall()` says in words why
its bf16 steps would be slower than its float32 steps on this machine, or returns None.
`products(x, W, dout, out, dW, dx)` runs a dense layer's three products alone, split as its kernels
split them: what `fastnet bench` compares a whole step with. A backend whose `parallelism()` says
`same_bits_on_any_thread_count` follows the cores that other processes leave free during training (follow_free_cores).

The Numba backend is registered lazily: importing numba and loading its compiled kernels takes
a noticeable fraction of a second, which a NumPy run should not pay.
"""

import contextlib
import importlib
import importlib.util
import os

from threadpoolctl import threadpool_info, threadpool_limits

from fastnet.backends import numba_cache, numpy_backend
from fastnet.cpu import FreeCores
from fastnet.errors import FastnetError

# Here, because every kernel module is this package's: its cached kernels are checked against the
# sources before any of them is imported.
numba_cache.drop_stale_kernels()

KERNELS = (
    "gather_normalize",
    "augment_gather_normalize",
    "gather_flip_components",
    "round_to_bf16",
    "bf16_to_float32",
    "dense_forward",
    "dense_relu_forward",
    "dense_backward",
    "dense_relu_backward",
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "dense_leaky_relu_forward",
    "dense_leaky_relu_backward",
    "tanh_forward",
    "tanh_backward",
    "dense_tanh_forward",
    "dense_tanh_backward",
    "gelu_forward",
    "gelu_backward",
    "dense_gelu_forward",
    "dense_gelu_backward",
    "layernorm_forward",
    "layernorm_backward",
    "draw_uniform",
    "dropout",
    "softmax_cross_entropy",
    "softmax_cross_entropy_smoothed",
    "count_correct",
    "sum_of_squares",
    "sgd_step",
    "momentum_step",
    "nesterov_step",
    "adam_step",
    "adamw_step",
    "ema_update",
)

# What a backend may provide besides its kernels (see use_threads and parallelism below).
HOOKS = ("use_threads", "parallelism", "bf16_gemm", "bf16_shortfall", "products")

DEFAULT = "numpy"
_backends = {}
# name -> (module to import on first use, the package it needs)
_lazy = {"numba": ("fastnet.backends.numba_backend", "numba")}
_unavailable = {}  # name -> why it cannot be used
_followers = {}  # (name, threads) -> the FreeCores that training on them uses


def register(name, backend):
    """Make `backend` available as `name`; it must provide every kernel in KERNELS."""
    missing = [kernel for kernel in KERNELS if not callable(getattr(backend, kernel, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks the kernels {', '.join(missing)}")
    _backends[name] = backend


def available():
    """The names of the usable backends: registered ones, and lazy ones whose package is installed."""
    lazy = [name for name, (_, package) in _lazy.items()
            if name not in _backends and name not in _unavailable and importlib.util.find_spec(package)]
    return list(_backends) + lazy


def resolve(name=None):
    """The name of the backend that get(name) returns: None means $FASTNET_BACKEND, or the default
    when that is unset."""
    name = name or os.environ.get("FASTNET_BACKEND") or DEFAULT
    if name not in _backends and name in _lazy:
        _load_lazy(name)
    if name in _unavailable:
        raise FastnetError(f"backend {name!r} is unavailable: {_unavailable[name]}")
    if name not in _backends:
        raise FastnetError(f"unknown backend {name!r}: choose one of {', '.join(available())}")
    return name


def _load_lazy(name):
    module, package = _lazy[name]
    try:
        register(name, importlib.import_module(module))
    except ImportError as exc:
        if importlib.util.find_spec(package) is None:
            _unavailable[name] = f"{package} is not installed; install it with pip install {package}"
        else:  # the package is there but it, or the backend module, fails to import
            _unavailable[name] = f"{module} cannot be imported ({exc}); reinstall {package} or report a bug"


def get(name=None):
    """The backend called `name` (see resolve)."""
    return _backends[resolve(name)]


register("numpy", numpy_backend)


def use_threads(name, threads):
    """A context in which backend `name`'s kernels run on `threads` cores (None: the backend's default)."""
    backend = get(name)
    if hasattr(backend, "use_threads"):
        return backend.use_threads(threads)
    return threadpool_limits(limits=threads, user_api="blas")


def parallelism(name):
    """How backend `name`'s kernels use the cores, as config.json and fastnet bench record it."""
    backend = get(name)
    if hasattr(backend, "parallelism"):
        described = backend.parallelism()
        if described.get("same_bits_on_any_thread_count"):
            described["while_training"] = (f"at most {described['threads']} threads, fewer while other processes "
                                           "keep cores busy (re-measured every "
                                           f"{FreeCores.WINDOW:g} s)")
        return described
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    return {"threads": max((lib["num_threads"] for lib in blas), default=1),
            "split": "BLAS's own threads, inside each product; every other pass on one thread"}


def follow_free_cores(name):
    """A context giving a callable to call after every training step: it keeps backend `name` on the
    cores other processes leave free (fastnet.cpu.FreeCores), at most those it has now, carried from
    one epoch to the next. Only for a backend whose results do not depend on its thread count; for
    another the callable does nothing."""
    described = parallelism(name)
    if "while_training" not in described:
        return contextlib.nullcontext(lambda: None)
    key = name, described["threads"]
    if key not in _followers:  # one per backend and limit, so that each epoch starts where the last ended
        _followers[key] = FreeCores(lambda threads: use_threads(name, threads), described["threads"])
    return _followers[key]


def bf16_shortfall(name):
    """Why backend `name`'s bf16 steps would be slower than its float32 steps here (one line), or None."""
    backend = get(name)
    return backend.bf16_shortfall() if hasattr(backend, "bf16_shortfall") else None


def bf16_gemm(name):
    """What multiplies backend `name`'s bfloat16 GEMM operands (None: nothing fast is installed)."""
    backend = get(name)
    if hasattr(backend, "bf16_gemm"):
        return backend.bf16_gemm()
    return "float32 matmul of the operands' bf16 values (NumPy; an emulation, for reference)"
