"""A run's folder: config.json, metrics.jsonl (one JSON object per epoch), model.npz (the model
after the last finished epoch, or with --val the best) and checkpoint.npz (everything needed to
resume, with the Progress of the run). Every file is written to a temporary name and renamed, so a
crash never leaves a half-written one."""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import zlib
from datetime import datetime

import numpy as np

from fastnet import checkpoint, storage
from fastnet.config import TrainConfig
from fastnet.errors import CheckpointError, FastnetError
from fastnet.loss_watch import LossWatch

# The metrics that measure time: they differ between runs that are otherwise bit-identical.
TIMING_METRICS = ("epoch_seconds", "samples_per_second", "train_seconds")
CHECKPOINT = "checkpoint.npz"  # the latest state, to resume from
MODEL = checkpoint.MODEL  # the model after the last finished epoch (with --val: the best), to evaluate and predict with
LOCK = ".lock"  # held by the fastnet train writing the folder; names its process
# What flock raises where the filesystem cannot lock (some NFS and FUSE mounts): such a folder is
# written unguarded, as it was before there was a lock, rather than not at all.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def make_run_dir(out):
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", stamp)
        suffix = 1
        while os.path.exists(out):
            suffix += 1
            out = os.path.join("runs", f"{stamp}-{suffix}")
    probe = os.path.join(out, ".fastnet-write-test")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w"):
            pass
    except OSError as exc:
        raise storage.unwritable_out(out, out, exc) from exc
    finally:
        with contextlib.suppress(OSError):  # also when its close failed
            os.unlink(probe)
    return out


def claim_run_dir(out, resuming=False):
    """Take the run folder `out` for this process, or FastnetError naming the process that has it.
    Returns the lock's file descriptor, to be closed with release_run_dir when the run ends.

    An advisory flock rather than a file whose existence means "taken": the kernel drops the lock
    when its holder dies, however it dies (kill -9 too), so it never outlives a run. The file
    stays, and holds the holder's pid and host only for the message."""
    path = os.path.join(out, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage.unwritable_out(out, path, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _NO_LOCKING:
            return fd
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FastnetError(f"cannot lock {path} ({exc.strerror}): pass another --out") from exc
        pid = holder[0] if holder else "?"  # between its flock and its write, the holder's pid is not there yet
        host = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        advice = "wait for it to finish" if resuming else "wait for it to finish, or pass another --out"
        raise FastnetError(f"{out} is in use by another fastnet train (process {pid}{host}): {advice}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise storage.unwritable_out(out, path, exc) from exc
    return fd


def checkpoint_stamp(run_dir):
    """What changes when checkpoint.npz is replaced (a rename gives it a new inode)."""
    try:
        stat = os.stat(os.path.join(run_dir, CHECKPOINT))
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def release_run_dir(fd):
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the flock


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint must hold, besides the model and optimizer, for a
    resumed run to continue exactly as if it had never stopped."""

    epochs_done: int = 0
    step: int = 0                     # global steps taken
    order: np.ndarray | None = None   # this epoch's permutation, once drawn
    seen: int = 0                     # images of this epoch trained on so far
    loss_sum: float = 0.0             # this epoch's running sums, for its train loss and accuracy
    correct: int = 0
    seconds: float = 0.0              # this epoch's training time so far, over every session
    history: list = dataclasses.field(default_factory=list)  # the metrics of every finished epoch
    watch: LossWatch | None = None    # the training loss, followed for a blow-up

    def state(self, rng):
        """The JSON-able part, with the generator's exact position."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("order", "watch")}
        watch = dataclasses.asdict(self.watch) if self.watch is not None else None
        return fields | {"watch": watch, "rng": rng.bit_generator.state}

    @classmethod
    def from_checkpoint(cls, arrays, rng):
        fields = json.loads(str(arrays["progress"]))
        rng.bit_generator.state = fields.pop("rng")
        watch = fields.pop("watch", None)  # None too in the checkpoints of runs from before the watch
        return cls(**fields, order=arrays.get("order"), watch=LossWatch(**watch) if watch is not None else None)


def data_fingerprint(labels, mean, std, input_size, num_classes):
    """Enough about the training data to tell, on resume, that it is the data the run began with."""
    return {"train_size": len(labels), "input_size": input_size, "num_classes": num_classes,
            "labels_crc32": zlib.crc32(np.ascontiguousarray(labels, np.int64).tobytes()),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def outcome(history, out):
    """The last epoch's metrics, the run folder, and the metrics of the epoch model.npz holds."""
    return history[-1] | {"out": out, "kept": history[best_epoch(history) - 1]}


def best_epoch(history):
    """The epoch model.npz keeps: the first with the best validation accuracy when there is a
    validation split, else the last one. Choosing by test accuracy would tune on the test set. Under
    --eval-every, only the evaluated epochs compete; before the first of them, the last epoch is kept."""
    validated = [i for i, m in enumerate(history) if "val_acc" in m]
    if not validated:
        return len(history)
    return max(validated, key=lambda i: (history[i]["val_acc"], -i)) + 1


def time_to_accuracy(history, thresholds=(0.50, 0.55, 0.60, 0.65, 0.70)):
    """One line: after how many seconds of training (evaluation excluded; the --pca fit and
    projection included) the test accuracy first reached each threshold; empty when it reached none."""
    reached = []
    for threshold in thresholds:
        first = next((m for m in history if m.get("test_acc", -1.0) >= threshold), None)
        if first is not None:
            reached.append(f"{threshold:.0%} after {first['train_seconds']:.1f} s (epoch {first['epoch']})")
    return ["time to test accuracy: " + ", ".join(reached)] if reached else []


def load_resume_checkpoint(run_dir, backend):
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT} to resume from: pass the folder of a run "
                              f"that fastnet train started")
    saved = checkpoint.load(path, backend=backend)
    if "progress" not in saved.arrays:
        raise CheckpointError(f"{path} holds a model but no training progress: it cannot be resumed; "
                              f"start a new run with fastnet train")
    return saved


def resumed_config(run_dir, **overrides):
    """The TrainConfig of the run in `run_dir`, with `overrides` (data, backend, checkpoint_every:
    what may change without changing the numbers) applied."""
    saved = load_resume_checkpoint(run_dir, overrides.get("backend"))
    fields = {name: saved.config[name] for name in TrainConfig.__dataclass_fields__ if name in saved.config}
    if "hidden" in fields:
        fields["hidden"] = tuple(fields["hidden"])
    fields["out"] = run_dir
    return TrainConfig(**fields | {k: v for k, v in overrides.items() if v is not None})


def check_same_data(saved, fingerprint, run_dir):
    """A run resumes on the data it was trained on (its fingerprint): checked before anything else is
    asked of the data, since other data would fail those checks for the wrong reason."""
    if saved.config.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"the data differs from the data the run in {run_dir} was trained on: pass "
                              f"--data with the original dataset")


def restore_state(saved, net, optimizer, rng, run_dir, average=None):
    """Load the parameters, optimizer state, weight average (an averaging.WeightAverage, with --ema)
    and progress of `saved` into this run's objects."""
    path = os.path.join(run_dir, CHECKPOINT)
    if [p.shape for p in saved.trained_net.params] != [p.shape for p in net.params] or \
            (saved.projection is None) == bool(saved.config.get("pca")):
        raise checkpoint.altered(path, saved.writer, "its network does not match its own config")
    net.load_params(saved.trained_net.params)
    try:
        optimizer.load_state_arrays(saved.arrays)
        progress = Progress.from_checkpoint(saved.arrays, rng)
    except (KeyError, ValueError, TypeError) as exc:  # a key, or a field of progress, missing or malformed
        raise checkpoint.altered(path, saved.writer, f"its optimizer state or progress is incomplete or malformed "
                                                     f"({checkpoint.first_line(exc)})") from exc
    if average is not None:
        try:
            average.load_state_arrays(saved.arrays)
        except (KeyError, ValueError) as exc:
            raise checkpoint.altered(path, saved.writer, f"its weight average (--ema) is incomplete or malformed "
                                                         f"({checkpoint.first_line(exc)})") from exc
    return progress


def write_metrics(out, history):
    storage.write_text_atomically(os.path.join(out, "metrics.jsonl"),
                                     "".join(json.dumps(summary) + "\n" for summary in history))
