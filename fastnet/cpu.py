"""What this machine's CPU is: its model name and instruction-set flags, from /proc/cpuinfo.

Every speed figure fastnet prints names the CPU beside it, and mixed precision needs to know
whether the CPU multiplies bfloat16 itself.
"""

VECTOR_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                ("amx_bf16", "AMX-BF16"))


def _cpuinfo_lines():
    try:
        with open("/proc/cpuinfo") as info:
            return info.read().splitlines()
    except OSError:
        return []


def flags():
    """The CPU's feature flags as the kernel names them (avx2, avx512_bf16, amx_bf16 ...)."""
    lines = _cpuinfo_lines()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def vendor():
    """GenuineIntel, AuthenticAMD ..., or None where /proc/cpuinfo does not say."""
    lines = _cpuinfo_lines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), None)


def model_name():
    lines = _cpuinfo_lines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def cpu_model():
    """The CPU's model name and the vector instructions that decide its GEMM speed."""
    present = flags()
    vector = [name for flag, name in VECTOR_FLAGS if flag in present]
    return f"{model_name()} ({', '.join(vector) or 'no AVX2'})"
