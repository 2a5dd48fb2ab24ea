"""Training follows the cores other processes leave free (fastnet.cpu.FreeCores): the threads it
chooses from the machine's load, and the same bits whatever it chooses."""

import contextlib
import importlib.util
import itertools
import os
import time

import numpy as np

from fastnet import backends, cpu
from fastnet.cpu import FreeCores, busy_neighbours
from helpers import unavailable


class Machine:
    """Readings a FreeCores sees, set by the test: each call of the governor is one second in which
    other processes kept `others` cores busy and this process one."""

    def __init__(self, monkeypatch):
        self.now, self.busy, self.own, self.others = 0.0, 0.0, 0.0, 0.0
        monkeypatch.setattr(cpu, "busy_seconds", lambda: self.busy)
        monkeypatch.setattr(cpu.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(cpu.time, "process_time", lambda: self.own)
        monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)

    def second(self, others):
        self.now, self.own, self.busy = self.now + 1, self.own + 1, self.busy + 1 + others


def recording_threads(entered):
    @contextlib.contextmanager
    def use_threads(threads):
        entered.append(threads)
        yield
        entered.append(-threads)  # left
    return use_threads


def test_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    machine, entered = Machine(monkeypatch), []
    with FreeCores(recording_threads(entered), limit=3, window=0.5) as follow:
        follow()  # the first call starts the first window
        chosen = []
        for others in (0.0, 2.0, 2.6, 3.9, 0.2, 1.4):  # on 4 cores
            machine.second(others)
            follow()
            chosen.append(follow.threads)
        assert chosen == [3, 2, 1, 1, 3, 3]  # never more than the limit, never fewer than one
        assert entered == [2, -2, 1, -1]  # the limit itself is the caller's context: nothing entered
        machine.now += 0.1
        machine.busy += 3.0
        follow()  # within the window: nothing read, nothing changed
        assert follow.threads == 3 and follow.windows == {3: 3, 2: 1, 1: 2}
        machine.second(3.0)
        follow()
    assert entered[-2:] == [1, -1]  # leaving gives the caller's threads back
    with follow:  # the next epoch starts where this one ended
        assert entered[-1] == 1 and follow.threads == 1
    assert entered[-1] == -1


def test_without_proc_stat_the_threads_stay(monkeypatch):
    monkeypatch.setattr(cpu, "busy_seconds", lambda: None)
    entered = []
    with FreeCores(recording_threads(entered), limit=2, window=0) as follow:
        for _ in range(3):
            follow()
    assert follow.threads == 2 and entered == [] and follow.windows == {}


def test_a_busy_neighbour_takes_a_thread_away():
    """Real processes, real /proc/stat: a spinner on every core leaves at most one thread."""
    cores = os.cpu_count()
    if cores < 2:
        unavailable("one core: there is no thread to take away")
    entered = []
    with busy_neighbours(cores), FreeCores(recording_threads(entered), limit=cores, window=0.5) as follow:
        follow()
        time.sleep(0.6)
        follow()
    assert follow.threads == 1 and entered == [1, -1]


def test_numpy_results_depend_on_blas_threads_so_it_does_not_follow(monkeypatch):
    entered = []
    monkeypatch.setattr(backends, "use_threads", lambda name, threads: recording_threads(entered)(threads))
    with busy_neighbours(os.cpu_count()), backends.follow_free_cores("numpy") as follow:
        follow()
        time.sleep(0.6)
        follow()
    assert entered == [] and not isinstance(follow, FreeCores)
    assert "while_training" not in backends.parallelism("numpy")


def test_a_numba_epoch_that_changes_threads_every_step_ends_on_the_same_bits(monkeypatch):
    if importlib.util.find_spec("numba") is None:
        unavailable("the numba backend needs numba: pip install numba")
    from fastnet.model import MLP
    from fastnet.optim import Optimizer, Schedule
    from fastnet.step import StepOptions, train_epoch

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (96, 48), dtype=np.uint8)
    labels = rng.integers(0, 3, 96)
    shift, scale = np.full(48, 127.5, np.float32), np.full(48, 1 / 64, np.float32)

    def epoch():
        net = MLP([48, 37, 21, 3], backend="numba", seed=2, dropout=0.25)
        optimizer = Optimizer(net.params, "momentum", momentum=0.9, backend="numba")
        train_epoch(net, optimizer, Schedule("constant", 0.05, 12), images, labels, shift, scale,
                    np.random.default_rng(1).permutation(96), 8, 1, 0,
                    options=StepOptions(np.random.default_rng(3)))
        return net.params

    if os.cpu_count() < 2:
        unavailable("one core: there is no thread to take away")
    with backends.use_threads("numba", 2):
        steady = epoch()
        assert backends.follow_free_cores("numba") is backends.follow_free_cores("numba")  # kept between epochs
        # Every step a window, in which the machine is alternately full (100 busy seconds) and idle,
        # from a fresh start on two threads (the steady epoch's own choices depended on the real load).
        monkeypatch.setattr(backends, "_followers", {})
        calls = itertools.count()
        monkeypatch.setattr(FreeCores, "WINDOW", 0.0)
        monkeypatch.setattr(cpu, "busy_seconds", lambda: 100.0 * ((next(calls) + 1) // 2))
        switched, real = [], backends.use_threads
        monkeypatch.setattr(backends, "use_threads", lambda name, threads: switched.append(threads) or
                            real(name, threads))
        moving = epoch()
    assert switched == [1] * 6, switched  # 12 steps: 11 windows after the first, every other one full
    assert "fewer while other processes keep cores busy" in backends.parallelism("numba")["while_training"]
    assert all(p.tobytes() == q.tobytes() for p, q in zip(steady, moving, strict=True))
