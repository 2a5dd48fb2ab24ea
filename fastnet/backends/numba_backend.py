"""The Numba backend: the reference kernels of numpy_backend.py as JIT-compiled loops, name for name.

What it does that NumPy cannot:
- fuses the passes NumPy makes one at a time: the bias and ReLU run as the epilogue of the forward
  GEMM, the ReLU mask and the bias-gradient column sums share one pass in backward, and each
  optimizer step is one loop over the parameter;
- writes every result into the caller's arrays, so a training step allocates nothing;
- keeps float32 arithmetic in float32: a Python float in Numba code is a float64, so scalars are
  first converted with `array.dtype.type(...)`, which also keeps float64 models in float64;
- divides as NumPy does (`error_model="numpy"`: inf or nan, no ZeroDivisionError). Numba's default
  checks every division for zero, and that branch kept the Adam loop from vectorising: 7x slower.

The products go through the GEMM driver of numba_gemm.py: BLAS held to one thread, each product
cut into tiles by its shape and the plan, claimed by whichever thread is free, each forward tile's
bias and activation done by the thread that computed the tile. Every dense kernel is one of two tile
loops (numba_dense: _dense_forward_tiles, _dense_backward_columns) with its activation chosen at
compile time, and every optimizer update is one (numba_update: _update_tiles) with its rule chosen
so. The other memory-bound loops (gathering the batch, the elementwise passes) split their rows
across the same threads with `prange`. Nothing is summed across tiles: every sum is done by one
thread in a fixed order, so results depend on neither thread timing nor the thread count. The
losses and count_correct stay serial: a 128 x 10 batch is less work than waking a thread. Compiled
code is cached on disk (`cache=True`), so a second process starts warm. Every kernel is compiled for
C-contiguous arrays alone (numba_contiguous.on_contiguous), which is what the model and optimizer
pass: an array of another layout is copied on the way in, and out. Every kernel releases the GIL
(`nogil=True`): a data-parallel rank's reducing thread (distributed.py, --overlap) sends gradients
while the main thread computes.

Every kernel keeps numpy_backend's return convention (arrays into the caller's outputs, None
returned; a number only where the result is one). The private helpers have one naming pattern. A
part of one kernel that Numba needs as a function of its own is `_<kernel>_<part>`: `_tiles`, a
parallel loop over a product's tiles; `_columns`, a backward kernel's parallel pass over column
tiles of dout before its products; `_row`, one row's work. A helper that several kernels share is
named for what it computes (`_weight_and_input_grads`, `_gelu`, `_row_max`), and one that
numpy_backend has too keeps the reference's name and arguments (`_adam`). The constants that define
a result (GELU's, SplitMix64's, bfloat16's bit patterns) are imported from numpy_backend. Numba
compiles a global in as a constant, and a called function into its caller, and its disk cache
checks only the source file of the function it caches: after changing a constant, or a helper that
a kernel of another file calls (numba_elementwise's _exp and _gelu reach numba_dense's tiles;
numba_bf16 and numba_gemm reach every part), delete the cached .nbi and .nbc files.

This module is the backend that the registry loads: the hooks are here, and the kernels are imported
from the modules that hold them, each named for what it holds: numba_elementwise (gathering a batch,
the bfloat16 conversions, the activations, dropout), numba_dense (the dense layer's tile loops,
their epilogues, and products), numba_layernorm, numba_loss (the losses and count_correct) and
numba_update (clipping's sum of squares, the optimizer steps and the weight average's).
"""

import contextlib
import os

if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
    # Numba caches next to the source by default; an installed, read-only package needs elsewhere.
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastnet", "numba")

from fastnet import cpu
from fastnet.backends import numba_gemm
from fastnet.backends.numba_blas import BF16_GEMMS

# The registry reaches each kernel as an attribute of this module.
from fastnet.backends.numba_dense import (  # noqa: F401
    dense_backward,
    dense_forward,
    dense_gelu_backward,
    dense_gelu_forward,
    dense_leaky_relu_backward,
    dense_leaky_relu_forward,
    dense_relu_backward,
    dense_relu_forward,
    dense_tanh_backward,
    dense_tanh_forward,
    products,
)
from fastnet.backends.numba_elementwise import (  # noqa: F401
    augment_gather_normalize,
    bf16_to_float32,
    draw_uniform,
    dropout,
    gather_flip_components,
    gather_normalize,
    gelu_backward,
    gelu_forward,
    leaky_relu_backward,
    leaky_relu_forward,
    relu_backward,
    relu_forward,
    round_to_bf16,
    tanh_backward,
    tanh_forward,
)
from fastnet.backends.numba_layernorm import layernorm_backward, layernorm_forward  # noqa: F401
from fastnet.backends.numba_loss import (  # noqa: F401
    count_correct,
    softmax_cross_entropy,
    softmax_cross_entropy_smoothed,
)
from fastnet.backends.numba_update import (  # noqa: F401
    adam_step,
    adamw_step,
    ema_update,
    momentum_step,
    nesterov_step,
    sgd_step,
    sum_of_squares,
)
from fastnet.errors import FastnetError

numba_gemm.hold_blas_to_one_thread()


@contextlib.contextmanager
def use_threads(threads):
    """A context in which the kernels split their work into `threads` tiles on as many threads
    (None: one per core, Numba's default)."""
    before = numba_gemm.threads()
    if threads is not None:
        if threads > numba_gemm.MAX_THREADS:
            raise FastnetError(f"--threads {threads} is more than the {numba_gemm.MAX_THREADS} threads Numba "
                               f"started with: pass at most {numba_gemm.MAX_THREADS}, or set "
                               f"NUMBA_NUM_THREADS={threads}")
        numba_gemm.use_threads(threads)
    try:
        yield
    finally:
        numba_gemm.use_threads(before)


def parallelism():
    return numba_gemm.describe()


def bf16_gemm():
    """The library of the bfloat16 products (MKL's or oneDNN's) and the instructions it uses, or None
    when only plain loops stand in."""
    return numba_gemm.BF16_GEMM.describe() if numba_gemm.BF16_GEMM.available else None


def bf16_shortfall():
    """Why bf16 steps would be slower than float32's here, or None: a bf16 GEMM that uses none of the
    CPU's bf16 instructions (MKL's on a CPU not Intel's converts to float32: R1 ran at 0.77x float32's
    speed on an AMD Zen 4), or a plan that measured bf16 steps slower."""
    gemm, measured = numba_gemm.BF16_GEMM, numba_gemm.MEASURED or {}
    if gemm.available and not gemm.instructions:
        others = [name for name in BF16_GEMMS if name != gemm.name]
        return (f"--precision bf16 would be slower than fp32 here: {gemm.name}'s bf16 GEMM uses none of this CPU's "
                f"bf16 instructions ({cpu.model_name()}) and converts to float32: pip install "
                f"'fastnet[{others[0]}]', whose GEMM does, or train with --precision fp32")
    speedup = measured.get("bf16_speedup", {}).get("R1")
    if speedup is not None and speedup < 1 and measured.get("bf16_gemm") == gemm.name:
        return (f"--precision bf16 ran R1's steps at {speedup:.2f}x fp32's speed on this machine ({gemm.name}'s bf16 "
                f"GEMM; fastnet plan, measured {measured['measured']}): train with --precision fp32")
    return None

NAME = "numba"
