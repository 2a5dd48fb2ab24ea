"""Data-parallel training over MPI: `mpirun -n N fastnet train --distributed ...`.

Every process (rank) holds the whole model and trains on its share of every global batch: rank r
of N takes rows [r*B//N, (r+1)*B//N) of the batch that one process would train on, drawn from the
one permutation the seed gives. Every random number of a step (flips, shifts, cutouts, dropout
masks) is drawn for the whole batch on every rank and each rank keeps its rows (`RowShare`), so the
ranks' generators never drift apart and N ranks train on what one process would.

After backward, each rank scales its gradients (means over its rows) by its share of the batch and
the ranks sum them, with the step's loss, correct count and stop request, in one flat buffer
(`reduce_in_rank_order`): a reduce-scatter and an all-gather, as a ring all-reduce moves, but each
segment is summed by its owner in rank order 0, 1, ..., N-1, so the result does not depend on the
order in which messages arrive. Every rank then applies the same update to the same parameters.

With --overlap, the buffer travels in buckets (_Layout): the upper layers' gradients are summed by a
thread of each rank while backward computes the first layer's, and the last bucket after backward.
Each number is still summed in rank order, so the bits are those of the one-buffer sum. The thread
takes its CPU from the computing threads: it pays only where the wire, not the CPU, is what the sum
waits for (a slow network), and benchmarks/RESULTS.md gives the figures.

Rank 0 alone writes the run folder; evaluation is split across the ranks and summed. Waiting for a
peer, a rank checks that the peers on its machine are alive and gives up after PEER_TIMEOUT
seconds (--peer-timeout), so that a rank that dies or hangs stops the others with one line naming it.
When a rank dies, Open MPI's mpirun also aborts the whole job within about a second (its
odls_base_sigkill_timeout) and names the rank in its own message; a surviving rank's line can be lost
when mpirun is faster. A rank that hangs (stopped, deadlocked, cut off) is noticed by fastnet alone.
"""

import hashlib
import os
import queue
import socket
import sys
import threading
import time

import numpy as np

from fastnet.errors import FastnetError, PeerLost, SettingError

# What mpirun (Open MPI, MPICH's hydra, PMIx launchers such as srun) sets in every process it starts.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# What Open MPI's mpirun needs to start ranks as root (containers, CI), which it refuses unless told twice.
AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
PEER_TIMEOUT = 120.0  # seconds; longer than rank 0 takes to write a checkpoint, shorter than a user waits
_REDUCE, _GATHER, _DIGEST = 1, 2, 3  # message tags: the two halves of the all-reduce, the parameter check


def start(peer_timeout=PEER_TIMEOUT, overlap=False):
    """The DataParallel of this process, or SettingError (exit status 2) when it cannot be one."""
    if not peer_timeout > 0:
        raise SettingError("peer_timeout", f"{{setting}} must be a positive number of seconds, got {peer_timeout}: "
                                           f"pass one such as {PEER_TIMEOUT:g}")
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        raise SettingError("distributed", "{setting} runs one process per share of each batch, started by MPI: "
                                          "launch it as mpirun -n 2 fastnet train --distributed ...")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise SettingError("distributed", f"{{setting}} needs mpi4py ({exc}): pip install 'fastnet[mpi]', with an "
                                          f"MPI library such as Debian's openmpi-bin") from None
    global running
    running = DataParallel(MPI.COMM_WORLD, peer_timeout, overlap)
    return running


running = None  # this process's DataParallel, once start() made it


def abort(status):
    """End this rank of a data-parallel run that failed here, at once: MPI's orderly exit would wait
    for peers that may be dead or stuck. Its launcher sees the failed rank and ends the others (Open
    MPI's mpirun does at once); MPI_Abort would too, but can lose the line this rank just printed."""
    if running is not None and running.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def share_bounds(rows, size, rank):
    """Rank `rank`'s rows [start, stop) of `rows`: contiguous, in rank order, sizes differing by at most one."""
    return rows * rank // size, rows * (rank + 1) // size


class RowShare:
    """The run's generator as one rank's step sees it: every `random(out=...)` call draws for the whole
    batch (first axis `rows`) from the shared generator and keeps this rank's rows [start, stop);
    `integers` draws as the shared generator does (dropout's keys), and `first_row` tells the
    kernels' draw_uniform where this rank's rows of a key's numbers begin."""

    def __init__(self, rng, start, stop, rows):
        self.rng, self.start, self.stop, self.rows = rng, start, stop, rows
        self.first_row = start
        self._scratch = {}

    def integers(self, *args, **kwargs):
        return self.rng.integers(*args, **kwargs)

    def random(self, size=None, dtype=np.float64, out=None):
        whole = (self.rows, *out.shape[1:])
        scratch = self._scratch.get((whole, out.dtype))
        if scratch is None:  # allocated once per shape: the steps allocate nothing
            scratch = self._scratch[(whole, out.dtype)] = np.empty(whole, out.dtype)
        self.rng.random(dtype=dtype, out=scratch)
        out[...] = scratch[self.start:self.stop]
        return out


class SingleProcess:
    """A run in one process, behind DataParallel's interface (what train.TrainingRun asks of the
    processes that share a run), each part trivial: the training loop has no branch on which it is."""

    size, writes, headline, resume_command = 1, True, "", "fastnet train"

    def __init__(self, after_backward=None):
        self.after_backward = after_backward
        self.stop_requested = lambda: False  # the training loop sets it: has a signal asked to stop?

    def step_hooks(self):
        return {"after_backward": self.after_backward}

    def describe(self):
        return None

    def broadcast(self, value):
        return value

    def check_same_parameters(self, params):
        pass

    @property
    def stopping(self):
        return self.stop_requested()

    def split_evaluation(self, inputs, net, labels):
        result = inputs.evaluate(net, labels)
        return result.loss, result.accuracy


class DataParallel:
    """One rank of a data-parallel run: its share of each batch, the all-reduce of its gradients, the
    split evaluation, and what only rank 0 does."""

    def __init__(self, comm, peer_timeout=PEER_TIMEOUT, overlap=False):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.peer_timeout = peer_timeout
        from mpi4py import MPI
        self.MPI = MPI
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_ranks = node.Get_size()
        node.Free()
        # Who is where: a waiting rank can tell a dead peer on its machine from a slow one.
        self.peers = comm.allgather((socket.gethostname(), os.getpid()))
        self.writes = self.rank == 0
        self.headline = f", data-parallel on {self.size} ranks"  # in the run's first log line
        self.resume_command = f"mpirun -n {self.size} fastnet train --distributed"
        self.stop_requested = lambda: False
        self.stopping = False  # every rank's answer to "has any rank been asked to stop?", after each step
        self.reduce_seconds = 0.0  # the steps' wall time spent waiting for the sums, for the cost model
        self._shares, self._layouts, self._received = {}, {}, {}
        self._reducer = None
        if overlap and self.size > 1:
            if MPI.Query_thread() < MPI.THREAD_SERIALIZED:  # the thread calls MPI while the main one computes
                raise SettingError("overlap", "{setting} sums from a thread of each rank, but MPI started without "
                                              "thread support: unset MPI4PY_RC_THREAD_LEVEL, or drop {setting}")
            self._reducer = _Reducer(self)
        self.layer_done = None if self._reducer is None else self._start_layer  # the backward hook

    def default_threads(self):
        """Cores per rank on this machine: the cores this process may use, shared by its node's ranks
        (Open MPI binds each of two ranks to a core of its own, which leaves one)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cores >= (os.cpu_count() or cores):  # not bound: the node's cores are shared out
            cores //= self.local_ranks
        return max(1, cores)

    def step_hooks(self):
        """The StepOptions fields that make a training step this rank's: StepOptions(**parallel.step_hooks())."""
        return {"share": self.share, "after_backward": self.after_backward, "layer_done": self.layer_done}

    def describe(self):
        return {"ranks": self.size, "ranks_per_node": self.local_ranks, "overlap": self.layer_done is not None}

    # --- A step --------------------------------------------------------------------------------------

    def share(self, batch, rng):
        """This rank's rows of the global batch, and the generator its draws come from."""
        start, stop = share_bounds(len(batch), self.size, self.rank)
        key = (len(batch), id(rng))
        shared = self._shares.get(key)
        if shared is None:
            shared = self._shares[key] = RowShare(rng, start, stop, len(batch))
        self._rows = len(batch)
        return batch[start:stop], shared

    def _start_layer(self, net, ws, layer):
        """The backward pass's layer_done hook: `layer`'s gradients are final, so they set off to be
        summed (on the reducing thread) while the layers below are computed."""
        layout = self._layout(net, ws)
        self._scale_into(layout, layer, len(ws.labels))
        if layer in layout.sends:
            self._reducer.submit(layout.sends[layer])

    def after_backward(self, net, ws, loss, correct):
        """Sum the gradients of the global batch across ranks in ws.grads; returns the global batch's
        mean loss and correct count, which every rank then reports."""
        rows, mine = self._rows, len(ws.labels)
        layout = self._layout(net, ws)
        layout.scalars[:] = (loss * mine if mine else 0.0, correct, float(self.stop_requested()))
        if self.layer_done is None:
            for layer in range(net.num_layers):
                self._scale_into(layout, layer, mine)
            started = time.perf_counter()
            self.reduce_in_rank_order(layout.buffer)
        else:  # the other buckets are on their way already; nothing is left to overlap the last one
            started = time.perf_counter()
            self._reducer.wait()
            self.reduce_in_rank_order(layout.last_bucket)
        self.reduce_seconds += time.perf_counter() - started
        for grad, view in layout.pairs:
            grad[...] = view
        loss_sum, correct, stop = layout.scalars
        self.stopping = bool(stop > 0)
        return float(loss_sum) / rows, int(round(float(correct)))

    def _scale_into(self, layout, layer, mine):
        # A rank's gradients are means over its rows: weighted by its share, they sum to the batch's mean.
        for grad, view in layout.layer_pairs[layer]:
            np.multiply(grad, grad.dtype.type(mine / self._rows), out=view)

    def _layout(self, net, ws):
        """Where ws's gradients go in the one flat buffer that the ranks sum: the last layer's first,
        as backward writes them, then the step's loss, correct count and stop request."""
        layout = self._layouts.get(id(ws))
        if layout is None or layout.ws is not ws:
            if len(self._layouts) >= 4:  # as many as the model keeps workspaces, give or take
                self._layouts.pop(next(iter(self._layouts)))
            layout = self._layouts[id(ws)] = _Layout(net, ws)
        return layout

    # --- The all-reduce -----------------------------------------------------------------------------

    def reduce_in_rank_order(self, buffer, comm=None, poll=0.0):
        """buffer = the sum of every rank's buffer, in place, the same bits on every rank and on every
        rerun: rank j receives segment j of every rank's buffer and sums them in rank order, then every
        rank gathers every segment. Each rank sends and receives 2 (N - 1) / N of the buffer.
        comm: the communicator (default: the run's); poll: seconds to sleep between tests of the
        messages (0: spin)."""
        if self.size == 1:
            return
        comm = comm or self.comm
        bounds = [share_bounds(buffer.size, self.size, r) for r in range(self.size)]
        start, stop = bounds[self.rank]
        received = self._received.get((buffer.size, buffer.dtype))
        if received is None:  # once per buffer: the steps allocate nothing
            width = buffer.size // self.size + 1
            received = self._received[(buffer.size, buffer.dtype)] = np.empty((self.size, width), buffer.dtype)
        requests, senders = [], []
        for peer in self._others():
            requests.append(comm.Irecv(received[peer, :stop - start], source=peer, tag=_REDUCE))
            senders.append(peer)
            lo, hi = bounds[peer]
            requests.append(comm.Isend(buffer[lo:hi], dest=peer, tag=_REDUCE))
            senders.append(peer)
        self._wait(requests, senders, "gradients", poll)
        # ((b0 + b1) + b2) + ...: on rank 0 into its own segment; elsewhere into row 0, which holds rank
        # 0's, then back. (IEEE addition commutes, so b0 + b1 is the same bits whichever holds b0.)
        segment, width = buffer[start:stop], stop - start
        total = segment if self.rank == 0 else received[0, :width]
        for r in range(1, self.size):
            total += segment if r == self.rank else received[r, :width]
        if self.rank != 0:
            segment[...] = total
        requests, senders = [], []
        for peer in self._others():
            lo, hi = bounds[peer]
            requests.append(comm.Irecv(buffer[lo:hi], source=peer, tag=_GATHER))
            senders.append(peer)
            requests.append(comm.Isend(segment, dest=peer, tag=_GATHER))
            senders.append(peer)
        self._wait(requests, senders, "summed gradients", poll)

    def _others(self):
        # Starting after this rank spreads the first messages over all the peers.
        return [(self.rank + i) % self.size for i in range(1, self.size)]

    def _wait(self, requests, senders, what, poll=0.0):
        """Wait for every request (senders[i]: the peer of requests[i]), sleeping `poll` seconds between
        tests; PeerLost naming the peers whose messages are still pending when one of them is dead (a
        peer on this machine), or after peer_timeout seconds."""
        deadline = time.monotonic() + self.peer_timeout
        next_check = time.monotonic() + 0.005
        while not self.MPI.Request.Testall(requests):
            if poll:
                time.sleep(poll)
            now = time.monotonic()
            if now < next_check:  # spin, as MPI_Wait does: a large message moves only while MPI is called
                continue
            next_check = now + 0.05
            pending = sorted({peer for request, peer in zip(requests, senders, strict=True) if not request.Test()})
            dead = [peer for peer in pending if not self._alive(peer)]
            if dead or (pending and now > deadline):
                culprits = dead or pending
                how = "died or was killed" if dead else f"sent nothing for {self.peer_timeout:g} s"
                names = ", ".join(f"rank {p} (pid {self.peers[p][1]} on {self.peers[p][0]})" for p in culprits)
                raise PeerLost(f"{names} {how} while rank {self.rank} waited for its {what}: stopping; the last "
                               f"checkpoint stays loadable")

    def _alive(self, peer):
        host, pid = self.peers[peer]
        if host != socket.gethostname():
            return True  # only the timeout can tell
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
        except OSError:
            return True

    # --- What ranks agree on ------------------------------------------------------------------------

    def sum_in_rank_order(self, values):
        """The sums over ranks of a few float64 numbers, in rank order."""
        buffer = np.array(values, np.float64)
        self.reduce_in_rank_order(buffer)
        return buffer

    def broadcast(self, value):
        """Rank 0's value of a small Python object, on every rank."""
        return self.comm.bcast(value, root=0)

    def check_same_parameters(self, params):
        """FastnetError unless every rank holds the same parameters, bit for bit: a rank whose numbers
        drifted (another CPU's arithmetic, a bug) is found at the checkpoint, not at the end."""
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes() for p in params)).digest()
        mine = np.frombuffer(digest, np.uint8).copy()
        theirs = np.empty((self.size, mine.size), np.uint8)
        requests, senders = [], []
        for peer in self._others():
            requests += [self.comm.Irecv(theirs[peer], source=peer, tag=_DIGEST),
                         self.comm.Isend(mine, dest=peer, tag=_DIGEST)]
            senders += [peer, peer]
        self._wait(requests, senders, "parameter digests")
        theirs[self.rank] = mine
        differ = [r for r in range(self.size) if not np.array_equal(theirs[r], theirs[0])]
        if differ:
            raise FastnetError(f"ranks {', '.join(map(str, differ))} hold parameters that differ from rank 0's: "
                               f"the ranks must run the same fastnet, numba and BLAS on the same kind of CPU")

    def split_evaluation(self, inputs, net, labels):
        """The loss and accuracy of `net` on `inputs` (evaluation.EvaluationInputs) with each rank evaluating
        its share of the images: the whole set's, the same on every rank."""
        start, stop = share_bounds(len(labels), self.size, self.rank)
        mine = inputs.rows(start, stop).evaluate(net, labels[start:stop])
        count = stop - start
        loss_sum, correct = self.sum_in_rank_order(
            [mine.loss * count if count else 0.0, mine.accuracy * count if count else 0.0])
        return loss_sum / len(labels), float(round(correct)) / len(labels)


class _Layout:
    """One workspace's gradients in the flat buffer that the ranks sum, the last layer's first (the
    order backward finishes them in), then the step's loss, correct count and stop request.
    Overlapping, the buffer travels in buckets: consecutive layers until one holds BUCKET_BYTES, each
    sent when backward finishes its lowest layer, and the last one (the step's three numbers with it)
    after backward. A bucket costs a round trip of messages, so small layers ride with the next."""

    BUCKET_BYTES = 1 << 18

    def __init__(self, net, ws):
        self.ws = ws
        self.buffer = np.empty(sum(g.size for g in ws.grads) + 3, ws.grads[0].dtype)
        self.layer_pairs = [None] * net.num_layers
        self.sends = {}  # layer -> the bucket to send once backward has finished it
        offset = start = 0
        for layer in reversed(range(net.num_layers)):
            pairs = []
            for grad in net.layer_grads(ws, layer):
                pairs.append((grad, self.buffer[offset:offset + grad.size].reshape(grad.shape)))
                offset += grad.size
            self.layer_pairs[layer] = pairs
            if layer > 0 and (offset - start) * self.buffer.itemsize >= self.BUCKET_BYTES:
                self.sends[layer], start = self.buffer[start:offset], offset
        self.last_bucket, self.scalars = self.buffer[start:], self.buffer[offset:]
        self.pairs = [pair for pairs in self.layer_pairs for pair in pairs]


class _Reducer:
    """A thread that sums buffers across ranks (reduce_in_rank_order), one after another in the order
    they are submitted, on a communicator of its own. The main thread computes meanwhile: the kernels
    release the GIL, and the thread sleeps between tests of its messages rather than spin against them."""

    POLL = 50e-6  # seconds between tests: about Linux's shortest sleep

    def __init__(self, parallel):
        self.parallel, self.comm = parallel, parallel.comm.Dup()
        self._todo, self._done = queue.SimpleQueue(), queue.SimpleQueue()
        self._pending, self._failed = 0, None
        threading.Thread(target=self._run, name="fastnet-allreduce", daemon=True).start()

    def submit(self, buffer):
        self._pending += 1
        self._todo.put(buffer)

    def wait(self):
        """Return once every submitted buffer holds its sum; raise the thread's error (PeerLost) if any."""
        error = None
        while self._pending:
            error = error or self._done.get()
            self._pending -= 1
        if error is not None:
            raise error

    def _run(self):
        while True:
            buffer = self._todo.get()
            if self._failed is None:  # after a failure the rest of the step's buckets fail at once
                try:
                    self.parallel.reduce_in_rank_order(buffer, self.comm, self.POLL)
                except Exception as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                    self._failed = exc
            self._done.put(self._failed)
