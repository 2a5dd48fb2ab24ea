"""Training precision: "fp32", float32 throughout, or "bf16", mixed precision whose GEMMs multiply
bfloat16 operands into float32 (see fastnet.model).

bf16 pays only where the CPU multiplies bfloat16 itself: Intel's AMX tiles (Sapphire Rapids and
later) or the AVX512-BF16 dot products (Cooper Lake, AMD Zen 4 and later), and only through a GEMM
that uses them: MKL's does on Intel's CPUs alone, oneDNN's wherever they are. Elsewhere a bf16 GEMM
converts to float32 first and runs no faster than float32, with 8 bits of mantissa instead of 24,
so `check` refuses it, as it refuses bf16 that this machine's plan measured slower than float32
(the backend's bf16_shortfall), unless $FASTNET_BF16_ANY_CPU is 1: for accuracy studies and tests
of the bf16 arithmetic on any CPU, at float32's speed or below.

"auto", a run's setting only (a recipe's), is bf16 wherever `check` would take bf16 without that
variable and the backend multiplies bfloat16 itself (not the numpy backend's emulation), else fp32:
config.json records which.
"""

import os

import numpy as np

from fastnet import backends, cpu, settings
from fastnet.errors import FastnetError

PRECISIONS = ("fp32", "bf16")
CHOICES = (*PRECISIONS, "auto")  # what a run may ask for: a precision, or the faster one here
BF16_INSTRUCTIONS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
ANY_CPU = "FASTNET_BF16_ANY_CPU"


def bf16_instructions(flags=None):
    """The CPU's bfloat16 multiply instructions, by their usual names (empty when it has none)."""
    flags = cpu.flags() if flags is None else flags
    return [name for flag, name in BF16_INSTRUCTIONS if flag in flags]


def check(precision, backend=None, flags=None, dtype=np.float32):
    """What config.json records of `precision` on `backend`, for master weights of `dtype`: {"precision",
    and for bf16 "instructions" and "gemm"}. Raises FastnetError, one line saying what is missing and
    what to do, when the CPU or the backend cannot run it, or would run it slower than fp32."""
    settings.one_of("precision", precision, CHOICES)
    if precision == "auto":
        return check(resolve(backend, flags, dtype), backend, flags) | {"asked": "auto"}
    if precision == "fp32":
        return {"precision": "fp32"}
    found = bf16_instructions(flags)
    anyway = os.environ.get(ANY_CPU) == "1"
    if not found and not anyway:
        raise FastnetError(f"--precision bf16 needs a CPU with AMX-BF16 or AVX512-BF16, and this one "
                           f"({cpu.model_name()}) has neither: train with --precision fp32 (or set {ANY_CPU}=1 "
                           f"to run bf16 anyway, no faster than fp32)")
    gemm = backends.bf16_gemm(backend)
    if gemm is None:
        raise FastnetError(f"--precision bf16 on the {backends.resolve(backend)} backend needs a bfloat16 GEMM, and "
                           f"neither MKL nor oneDNN is installed: pip install 'fastnet[mkl]' on an Intel CPU, "
                           f"'fastnet[onednn]' on another")
    shortfall = backends.bf16_shortfall(backend)
    if shortfall and not anyway:
        raise FastnetError(f"{shortfall} (or set {ANY_CPU}=1 to run bf16 anyway)")
    return {"precision": "bf16", "instructions": found or [f"none ({ANY_CPU}=1)"], "gemm": gemm}


def resolve(backend=None, flags=None, dtype=np.float32):
    """What "auto" runs as on `backend` here: "bf16" where the CPU multiplies bfloat16, the backend
    has a GEMM that uses the instructions and its plan did not measure bf16 slower; else "fp32", and
    always for float64 master weights, since bf16 keeps float32 ones."""
    fast = (np.dtype(dtype) == np.float32 and bf16_instructions(flags) and hasattr(backends.get(backend), "bf16_gemm")
            and backends.bf16_gemm(backend) is not None and not backends.bf16_shortfall(backend))
    return "bf16" if fast else "fp32"
