"""What this machine's CPU is: its model name and instruction-set flags, from /proc/cpuinfo.

Every speed figure fastnet prints names the CPU beside it, and mixed precision needs to know
whether the CPU multiplies bfloat16 itself, and how busy other processes keep it while a figure is
measured.
"""

import contextlib
import os
import resource
import subprocess
import sys
import time

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


# --- Other load: the biggest source of noise in a speed figure -------------------------------------
# OpenBLAS's spinning threads slow down many times over when a third process takes one of two cores,
# so every harness measures how busy the rest of the machine kept the CPU while it timed something.

DISTURBED = 0.1  # cores kept busy by other processes above which a measurement is flagged


def busy_seconds():
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), or None without it."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def wait_until_quiet(limit):
    """Wait, up to `limit` seconds, for one second in which the machine keeps < DISTURBED cores busy."""
    deadline = time.perf_counter() + limit
    while True:
        before = busy_seconds()
        time.sleep(1.0)
        if before is None or busy_seconds() - before < DISTURBED or time.perf_counter() > deadline:
            return


def run_child(command, **options):
    """subprocess.run(command, **options), and how many cores processes other than the child (and
    this one, which waits) kept busy on average while it ran: 0.0 on an idle machine."""
    before, own_before, started = busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, **options)
    own_after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - started
    if before is None:
        return done, 0.0
    own = (own_after.ru_utime - own_before.ru_utime) + (own_after.ru_stime - own_before.ru_stime)
    return done, max(busy_seconds() - before - own, 0.0) / wall


@contextlib.contextmanager
def busy_neighbours(count):
    """`count` processes that each keep one core busy (a Python loop that never sleeps) while the
    context lasts: the neighbour a user's browser, data loader or other job would be, made the same
    for every side of a comparison. They run at normal priority and are killed on the way out.
    Yields their Popen objects; `process_seconds(p.pid)` tells how much CPU one of them got."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
                for _ in range(count)]
    try:
        time.sleep(0.2 if spinners else 0)  # started and spinning before the measurement begins
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def process_seconds(pid):
    """CPU seconds process `pid` has used so far (/proc/PID/stat), or 0.0 where that is not readable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
