"""Data-parallel training over MPI (fastnet.distributed), run as users run it: `mpirun -n N python -m
fastnet train --distributed`, against one process on the same global batches.

Under CI (.ci/run installs Debian's Open MPI and mpi4py) a missing mpirun is a failure, not a skip.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import pairwise

import numpy as np
import pytest

from fastnet import checkpoint
from fastnet.distributed import AS_ROOT, RowShare, _Layout, share_bounds
from fastnet.model import MLP
from helpers import assert_one_line_error, fastnet, save_brightness_classes, unavailable

# CI runs as root; oversubscribe: more ranks than cores; Open MPI's own connections on loopback.
MPI_ENV = AS_ROOT | {"OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
                     "OMPI_MCA_btl_tcp_if_include": "lo"}
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_")


def mpirun_command(ranks, *args):
    if shutil.which("mpirun") is None:
        unavailable("mpirun is not installed: apt-get install openmpi-bin (and pip install mpi4py)")
    return ["mpirun", "-n", str(ranks), sys.executable, "-m", "fastnet", *map(str, args)]


def environment():
    return {k: v for k, v in os.environ.items() if not k.startswith(("FASTNET_", *LAUNCHER_PREFIXES))} | MPI_ENV


def mpirun(ranks, *args, env=None):
    return subprocess.run(mpirun_command(ranks, *args), env=environment() | (env or {}), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """300 training and 90 test 4x4 images of three brightness classes."""
    return save_brightness_classes(tmp_path_factory.mktemp("images"), np.random.default_rng(0),
                                   {"train": 300, "test": 90}, side=4, step=80, base=40, noise=20)


def parameters(run):
    return checkpoint.load(os.path.join(run, "checkpoint.npz")).trained_net.params


def train_both_ways(tmp_path, images, ranks, *settings, env=None):
    """The same run on `ranks` ranks (one thread each, unless settings say) and in one process; returns
    both run folders."""
    common = ["train", "--data", images, *settings]
    together = tmp_path / f"ranks{ranks}"
    result = mpirun(ranks, *common, "--distributed", "--out", together, env=env)
    assert result.returncode == 0, result.stderr
    alone = tmp_path / "alone"
    result = fastnet(*common, "--out", alone, env=env)
    assert result.returncode == 0, result.stderr
    return together, alone


@pytest.mark.parametrize("ranks, backend, settings", [
    (2, "numba", ["--hidden", "7", "--batch-size", "300"]),  # the whole set in one batch: one step
    (2, "numpy", ["--hidden", "7", "--batch-size", "300"]),
    (3, "numba", ["--hidden", "17,5", "--batch-size", "299", "--dropout", "0.2", "--flip", "--translate", "1"]),
])
def test_one_step_on_n_ranks_is_the_one_process_step_to_float32_rounding(tmp_path, images, ranks, backend, settings):
    together, alone = train_both_ways(tmp_path, images, ranks, "--backend", backend, "--epochs", 1, "--lr", 0.1,
                                      "--weight-decay", 0, *settings)
    for p, q in zip(parameters(together), parameters(alone), strict=True):
        assert p.shape == q.shape and p.dtype == q.dtype == np.float32
        assert np.max(np.abs(p - q)) <= 1e-5 * np.max(np.abs(q))
    # The step moved them (equal to rounding is not equal to where the seed put them)...
    sizes = [W.shape[0] for W in parameters(alone)[0::2]] + [parameters(alone)[-2].shape[1]]
    initial = MLP(sizes, seed=np.random.default_rng(0)).params
    assert all(np.max(np.abs(p - q)) > 1e-3 * np.max(np.abs(q))
               for p, q in zip(parameters(alone), initial, strict=True))
    # ...and the ranks' split evaluation found the whole test set's figures.
    split, whole = (json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (together, alone))
    assert split["test_acc"] == whole["test_acc"]
    assert split["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert split["train_acc"] == whole["train_acc"]

def test_more_threads_per_rank_than_a_product_has_tiles_train_what_one_process_trains(tmp_path, images):
    """Open MPI binds each of two ranks to a core, and Numba starts one thread per core it may use:
    NUMBA_NUM_THREADS=3 with --threads 3 puts three on that core, and the weight gradients of 7 x 5
    and 5 x 3 leave one of them without rows (numba_gemm.product_tile)."""
    together, alone = train_both_ways(tmp_path, images, 2, "--backend", "numba", "--epochs", 1, "--hidden", "7,5",
                                      "--batch-size", 300, "--threads", 3, env={"NUMBA_NUM_THREADS": "3"})
    for p, q in zip(parameters(together), parameters(alone), strict=True):
        assert np.max(np.abs(p - q)) <= 1e-5 * np.max(np.abs(q))
    assert json.loads((together / "config.json").read_text())["parallelism"]["threads"] == 3


def test_batch_one_over_two_ranks_trains_what_one_process_trains(tmp_path, images):
    """Every batch of one image leaves a rank with no rows: it sends zero gradients, and still draws the
    batch's random numbers, so the ranks stay in step."""
    together, alone = train_both_ways(tmp_path, images, 2, "--backend", "numba", "--epochs", 1, "--hidden", "5",
                                      "--batch-size", 1, "--dropout", 0.3, "--lr", 0.01)
    for p, q in zip(parameters(together), parameters(alone), strict=True):
        assert np.max(np.abs(p - q)) <= 1e-4 * np.max(np.abs(q))
    lines = [line for line in open(together / "metrics.jsonl")]
    assert len(lines) == 1 and '"test_acc"' in lines[0]


def test_reruns_on_two_ranks_are_bit_identical_and_rank_0_alone_writes(tmp_path, images):
    args = ["train", "--data", images, "--distributed", "--backend", "numba", "--epochs", 3, "--hidden", "9",
            "--batch-size", 32, "--dropout", 0.1, "--flip"]
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        result = mpirun(2, *args, "--out", out)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("done: test accuracy") == 1  # rank 0 reports; the others are silent
        assert result.stdout.count("epoch 3/3") == 1
    for p, q in zip(parameters(first), parameters(second), strict=True):
        assert p.tobytes() == q.tobytes()
    assert sorted(os.listdir(first)) == [".lock", "checkpoint.npz", "config.json", "metrics.jsonl", "model.npz"]
    config = json.loads((first / "config.json").read_text())
    assert config["distributed"] == {"ranks": 2, "ranks_per_node": 2, "overlap": False}
    assert config["parallelism"]["threads"] == 1  # two ranks on two cores: one thread each


def test_rank_0_saves_the_weight_average_that_one_process_saves(tmp_path, images):
    """--ema on two ranks: every rank averages the same parameters, and model.npz, which rank 0 writes,
    holds the average that one process computes on the same batches, to float32 rounding; the epoch
    figures, evaluated split across the ranks, are the average's too."""
    together, alone = train_both_ways(tmp_path, images, 2, "--backend", "numba", "--epochs", 2, "--hidden", "7",
                                      "--batch-size", 30, "--ema", 0.9)
    models = [checkpoint.load(os.path.join(run, "model.npz")).net.params for run in (together, alone)]
    for p, q, raw in zip(*models, parameters(alone), strict=True):
        assert np.max(np.abs(p - q)) <= 1e-5 * np.max(np.abs(q))
        assert np.max(np.abs(q - raw)) > 1e-3 * np.max(np.abs(q))  # the average, not the parameters
    split, whole = (json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (together, alone))
    assert split["ema"] == whole["ema"] == 0.9 and split["test_acc"] == whole["test_acc"]
    assert split["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)


def test_overlapping_the_sums_with_backward_gives_the_same_bits(tmp_path, images):
    """--overlap sends the upper layers' bucket from a thread while backward computes the first layer
    (300 x 300 floats are more than a bucket's worth); each number is still summed in rank order."""
    args = ["train", "--data", images, "--distributed", "--backend", "numba", "--epochs", 2, "--hidden", "300,300",
            "--batch-size", 50, "--norm", "layernorm", "--dropout", 0.1]
    plain, overlapped = tmp_path / "plain", tmp_path / "overlapped"
    for out, extra in ((plain, []), (overlapped, ["--overlap"])):
        result = mpirun(2, *args, *extra, "--out", out)
        assert result.returncode == 0, result.stderr
    assert json.loads((overlapped / "config.json").read_text())["distributed"]["overlap"] is True
    for p, q in zip(parameters(plain), parameters(overlapped), strict=True):
        assert p.tobytes() == q.tobytes()
    assert (plain / "metrics.jsonl").read_text().count("test_acc") == 2


def run_until_epoch(out, epochs, *args):
    """mpirun -n 2 of `args`, started and returned once `out` holds `epochs` epochs' metrics."""
    process = subprocess.Popen(mpirun_command(2, *args, "--out", out), env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < epochs:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


TRAIN_FOR_A_WHILE = ["--distributed", "--backend", "numpy", "--epochs", 40, "--hidden", "6", "--batch-size", 10]
# mpirun takes about a second to pass a Ctrl-C on to the ranks, and 40 epochs take about that long
# on a fast machine: about 5 s, then.
TRAIN_UNTIL_STOPPED = [*TRAIN_FOR_A_WHILE[:4], 200, *TRAIN_FOR_A_WHILE[5:]]


def test_a_killed_rank_stops_the_run_naming_it_and_the_resumed_run_is_bit_identical(tmp_path, images):
    args = ["train", "--data", images, *TRAIN_FOR_A_WHILE]
    whole = tmp_path / "whole"
    assert mpirun(2, *args, "--out", whole).returncode == 0
    broken = tmp_path / "broken"
    process = run_until_epoch(broken, 3, *args)
    os.kill(rank_process(1, broken), signal.SIGKILL)
    out, err = process.communicate(timeout=60)  # bounded: the other rank must not hang
    assert process.returncode != 0 and "Traceback" not in err
    # Rank 0 names it when it gets to (it was waiting for rank 1); mpirun, aborting the job, always does.
    ours = [line for line in err.splitlines() if line.startswith("fastnet: error: ")]
    assert len(ours) <= 1 and all("rank 1 (pid" in line and "died or was killed while rank 0" in line
                                  for line in ours), err
    assert "process rank 1" in err or ours, err
    result = mpirun(2, "train", "--distributed", "--resume", broken)
    assert result.returncode == 0, result.stderr
    for p, q in zip(parameters(broken), parameters(whole), strict=True):
        assert p.tobytes() == q.tobytes()


def test_ctrl_c_on_mpirun_stops_every_rank_at_one_step_and_says_how_to_resume(tmp_path, images):
    """mpirun passes Ctrl-C on to the ranks as SIGTERM; the stop request travels in the step's buffer, so
    both ranks stop after the same step, rank 0 saves the checkpoint, and the resumed run ends where
    a run that never stopped ends."""
    args = ["train", "--data", images, *TRAIN_UNTIL_STOPPED]
    stopped = tmp_path / "stopped"
    process = run_until_epoch(stopped, 2, *args)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fastnet: ")]
    assert len(lines) == 1 and "stopped by SIG" in lines[0], err
    assert f"continue with: mpirun -n 2 fastnet train --distributed --resume {stopped}" in lines[0]
    result = mpirun(2, "train", "--distributed", "--resume", stopped)
    assert result.returncode == 0, result.stderr
    whole = tmp_path / "whole"
    assert mpirun(2, *args, "--out", whole).returncode == 0
    for p, q in zip(parameters(stopped), parameters(whole), strict=True):
        assert p.tobytes() == q.tobytes()


@pytest.mark.parametrize("overlap", [[], ["--overlap", "--hidden", "6,300,300"]], ids=["", "overlap"])
def test_a_rank_that_hangs_stops_the_other_after_the_peer_timeout_with_one_line(tmp_path, images, overlap):
    broken = tmp_path / "hung"
    process = run_until_epoch(broken, 2, "train", "--data", images, *TRAIN_FOR_A_WHILE, "--peer-timeout", 2,
                              *overlap)
    hung = rank_process(1, broken)
    os.kill(hung, signal.SIGSTOP)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)
    assert process.returncode != 0 and "Traceback" not in err
    # One line from the rank that waited; mpirun continues the stopped rank to end it, and it may say
    # that rank 0 is gone, in a line of its own.
    ours = [line for line in err.splitlines() if line.startswith("fastnet: error: ") and "while rank 0" in line]
    assert len(ours) == 1 and f"rank 1 (pid {hung}" in ours[0] and "sent nothing for 2 s" in ours[0], err
    assert all("while rank 1" in line for line in err.splitlines() if line.startswith("fastnet:") and line not in ours)
    checkpoint.load(os.path.join(broken, "checkpoint.npz"))  # still loadable


def rank_process(rank, out):
    """The pid of the fastnet process that mpirun started as `rank`, writing to `out`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if variables.get(b"OMPI_COMM_WORLD_RANK") == str(rank).encode() and str(out).encode() in command:
            return int(pid)
    raise AssertionError(f"no rank {rank} process of {out}")


# --- Refusals ----------------------------------------------------------------------------------------

def test_distributed_outside_mpirun_says_how_to_launch(tmp_path, images):
    env = {k: "" for k in os.environ if k.startswith(LAUNCHER_PREFIXES)}
    result = subprocess.run([sys.executable, "-m", "fastnet", "train", "--distributed", "--data", str(images),
                             "--out", str(tmp_path / "run")], env=environment() | env, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "--distributed", "mpirun -n 2 fastnet train --distributed")
    assert not (tmp_path / "run").exists()


def test_a_bad_setting_under_mpirun_q_is_one_line(tmp_path):
    """Every rank meets it; rank 0 says it, and `mpirun -q` (docs/data-parallel.md's advice) keeps Open MPI's
    banner about the ranks' exit status out."""
    command = mpirun_command(2, "train", "--distributed", "--data", tmp_path / "missing", "--out", tmp_path / "run")
    result = subprocess.run([command[0], "-q", *command[1:]], env=environment(), capture_output=True, text=True,
                            timeout=120)
    assert_one_line_error(result, "does not exist", "--data")
    assert not (tmp_path / "run").exists()


def test_overlap_without_distributed_says_what_to_add(tmp_path, images):
    result = fastnet("train", "--overlap", "--data", images, "--out", tmp_path / "run")
    assert_one_line_error(result, "--overlap", "--distributed")
    assert not (tmp_path / "run").exists()


def test_distributed_without_mpi4py_says_what_to_install(tmp_path, images):
    stub = tmp_path / "no-mpi4py" / "mpi4py"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = environment() | {"PYTHONPATH": str(stub.parent), "OMPI_COMM_WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, "-m", "fastnet", "train", "--distributed", "--data", str(images),
                             "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--distributed", "mpi4py", "pip install")
    assert not (tmp_path / "run").exists()


# --- The parts, in one process ---------------------------------------------------------------------

@pytest.mark.parametrize("rows, size", [(1, 2), (7, 3), (128, 2), (5, 8)])
def test_shares_cover_the_batch_in_rank_order(rows, size):
    bounds = [share_bounds(rows, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in pairwise(bounds))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_a_rank_draws_its_rows_of_what_one_process_draws():
    """Dropout's masks (rows x width) and augmentation's draws (rows,), in a step's order: each rank's
    draws are its rows of the single process's, and its generator ends where that one does."""
    alone = np.random.default_rng(7)
    whole = [alone.random(dtype=np.float32, out=np.empty((5, 3), np.float32)), alone.random(out=np.empty(5))]
    for start, stop in [(0, 2), (2, 5), (3, 3)]:
        rng = np.random.default_rng(7)
        share = RowShare(rng, start, stop, 5)
        mine = [share.random(dtype=np.float32, out=np.empty((stop - start, 3), np.float32)),
                share.random(out=np.empty(stop - start))]
        for m, w in zip(mine, whole, strict=True):
            assert m.dtype == w.dtype and np.array_equal(m, w[start:stop])
        assert rng.bit_generator.state == alone.bit_generator.state


@pytest.mark.parametrize("bucket_bytes, sent", [(1, [2, 1]), (300 * 4, [1]), (10 ** 9, [])])
def test_the_flat_buffer_holds_the_layers_last_first_in_buckets(monkeypatch, bucket_bytes, sent):
    """Layer 1 of 16-30-20-5 has W, b, gain and bias; the buckets that go during backward (`sends`)
    end at the layers given, and the last one is the rest of the buffer, the step's numbers with it."""
    monkeypatch.setattr(_Layout, "BUCKET_BYTES", bucket_bytes)
    net = MLP([16, 30, 20, 5], norm="layernorm")
    ws = net.workspace(4)
    layout = _Layout(net, ws)
    for i, grad in enumerate(ws.grads):
        grad[...] = i + 1
    for grad, view in layout.pairs:
        view[...] = grad
    sizes = [sum(g.size for g in net.layer_grads(ws, layer)) for layer in range(3)]
    expected = np.concatenate([np.concatenate([g.ravel() for g in net.layer_grads(ws, layer)]) for layer in (2, 1, 0)])
    assert layout.buffer.dtype == np.float32 and layout.buffer.size == sum(sizes) + 3
    assert np.array_equal(layout.buffer[:-3], expected) and layout.scalars.size == 3
    assert sorted(layout.sends, reverse=True) == sent
    buckets = [layout.sends[layer] for layer in sent] + [layout.last_bucket]
    assert sum(b.size for b in buckets) == layout.buffer.size
    ends = np.cumsum([b.size for b in buckets])
    assert all(np.shares_memory(b, layout.buffer) for b in buckets)
    assert list(ends[:-1]) == [sum(sizes[layer:]) for layer in sent]


def test_the_all_reduce_sums_in_rank_order_bit_for_bit(tmp_path):
    """Three ranks reduce buffers of awkward lengths (fewer elements than ranks, odd sizes) and each
    checks the result against the sum it computes itself of every rank's buffer, in rank order."""
    script = tmp_path / "reduce.py"
    script.write_text("""
import numpy as np
from fastnet import distributed
parallel = distributed.start()
for size in (1, 2, 7, 1000):
    for dtype in (np.float32, np.float64):
        mine = (np.random.default_rng(parallel.rank * 1000 + size).standard_normal(size) * 1e4).astype(dtype)
        expected = np.zeros(size, dtype)
        for r in range(parallel.size):
            expected += (np.random.default_rng(r * 1000 + size).standard_normal(size) * 1e4).astype(dtype)
        buffer = mine.copy()
        parallel.reduce_in_rank_order(buffer)
        assert buffer.tobytes() == expected.tobytes(), (size, dtype)
open(f"rank{parallel.rank}.ok", "w").close()  # not print: mpirun interleaves the ranks' output
""")
    if shutil.which("mpirun") is None:
        unavailable("mpirun is not installed: apt-get install openmpi-bin (and pip install mpi4py)")
    result = subprocess.run(["mpirun", "-n", "3", sys.executable, str(script)], env=environment(),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok", "rank2.ok"]
