"""What this machine's CPU is: its model name and instruction-set flags, from /proc/cpuinfo, and how
much of it other processes take.

Every speed figure fastnet prints names the CPU beside it, and mixed precision needs to know
whether the CPU multiplies bfloat16 itself, and how busy other processes keep it while a figure is
measured. Training follows the cores that other processes leave free (FreeCores).
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


class FreeCores:
    """Runs kernels on as many threads as other processes leave cores free, at most `limit`: call the
    object after every step. Every `window` seconds it reads how busy the machine was (/proc/stat)
    less this process's own CPU time, and enters use_threads(n) for the cores left, rounded. Leaving
    the context gives the caller's threads back; entering it again (the next epoch) starts from the
    threads it last chose.

    Why: beside a busy process, Linux gives a process whose threads wait for each other at every
    kernel's end about one core's worth of time, however many threads it has, and two threads
    sharing that core run slower than one (benchmarks/RESULTS.md). Only for kernels whose results do
    not depend on the thread count: the choice depends on timing, the numbers must not.
    """

    WINDOW = 0.25  # seconds: /proc/stat counts in 10 ms ticks, so a window's reading is good to 0.1 core

    def __init__(self, use_threads, limit, window=None):
        self.use_threads, self.limit, self.window = use_threads, limit, window
        self.threads = limit
        self.windows = {}  # threads -> how many windows ran on that many
        self._stack = contextlib.ExitStack()
        self._since = None

    def __enter__(self):
        if self.threads != self.limit:  # where the last epoch left off
            self._stack.enter_context(self.use_threads(self.threads))
        return self

    def __exit__(self, *exc_info):
        self._stack.close()

    def __call__(self):
        now = time.perf_counter()
        window = self.WINDOW if self.window is None else self.window
        if self._since is not None and now - self._since[0] < window:
            return
        busy, own = busy_seconds(), time.process_time()
        if busy is None:
            return
        if self._since is not None:
            started, busy_before, own_before = self._since
            others = max(0.0, (busy - busy_before) - (own - own_before)) / (now - started)
            self.windows[self.threads] = self.windows.get(self.threads, 0) + 1
            threads = max(1, min(self.limit, int(os.cpu_count() - others + 0.5)))
            if threads != self.threads:
                self._stack.close()
                if threads != self.limit:
                    self._stack.enter_context(self.use_threads(threads))
                self.threads = threads
        self._since = now, busy, own
