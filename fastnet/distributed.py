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

Rank 0 alone writes the run folder; evaluation is split across the ranks and summed. Waiting for a
peer, a rank checks that the peers on its machine are alive and gives up after PEER_TIMEOUT
seconds (--peer-timeout), so that a rank that dies or hangs stops the others with one line naming it.
When a rank dies, Open MPI's mpirun also aborts the whole job within about a second (its
odls_base_sigkill_timeout) and names the rank in its own message; a surviving rank's line can be lost
when mpirun is faster. A rank that hangs (stopped, deadlocked, cut off) is noticed by fastnet alone.
"""

import hashlib
import os
import socket
import sys
import time

import numpy as np

from fastnet.errors import FastnetError, PeerLost, SettingError

# What mpirun (Open MPI, MPICH's hydra, PMIx launchers such as srun) sets in every process it starts.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
PEER_TIMEOUT = 120.0  # seconds; longer than rank 0 takes to write a checkpoint, shorter than a user waits
_REDUCE, _GATHER, _DIGEST = 1, 2, 3  # message tags: the two halves of the all-reduce, the parameter check


def start(peer_timeout=PEER_TIMEOUT):
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
    running = DataParallel(MPI.COMM_WORLD, peer_timeout)
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
    batch (first axis `rows`) from the shared generator and keeps this rank's rows [start, stop)."""

    def __init__(self, rng, start, stop, rows):
        self.rng, self.start, self.stop, self.rows = rng, start, stop, rows
        self._scratch = {}

    def random(self, size=None, dtype=np.float64, out=None):
        whole = (self.rows, *out.shape[1:])
        scratch = self._scratch.get((whole, out.dtype))
        if scratch is None:  # allocated once per shape: the steps allocate nothing
            scratch = self._scratch[(whole, out.dtype)] = np.empty(whole, out.dtype)
        self.rng.random(dtype=dtype, out=scratch)
        out[...] = scratch[self.start:self.stop]
        return out


class DataParallel:
    """One rank of a data-parallel run: its share of each batch, the all-reduce of its gradients, the
    split evaluation, and what only rank 0 does."""

    def __init__(self, comm, peer_timeout=PEER_TIMEOUT):
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
        self.stop_requested = lambda: False
        self.stopping = False
        self.reduce_seconds = 0.0  # wall time in reduce_in_rank_order, for the cost model's measured side
        self._shares, self._buffer, self._received = {}, None, {}

    def default_threads(self):
        """Cores per rank on this machine: the cores this process may use, shared by its node's ranks
        (Open MPI binds each of two ranks to a core of its own, which leaves one)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cores >= (os.cpu_count() or cores):  # not bound: the node's cores are shared out
            cores //= self.local_ranks
        return max(1, cores)

    def describe(self):
        return {"ranks": self.size, "ranks_per_node": self.local_ranks}

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

    def after_backward(self, net, ws, loss, correct):
        """Sum the gradients of the global batch across ranks in ws.grads; returns the global batch's
        mean loss and correct count, which every rank then reports."""
        rows, mine = self._rows, len(ws.labels)
        buffer = self._flat_buffer(ws.grads)
        offset = 0
        for grad in ws.grads:
            view = buffer[offset:offset + grad.size].reshape(grad.shape)
            np.multiply(grad, grad.dtype.type(mine / rows), out=view)
            offset += grad.size
        buffer[offset:] = (loss * mine if mine else 0.0, correct, float(self.stop_requested()))
        self.reduce_in_rank_order(buffer)
        offset = 0
        for grad in ws.grads:
            grad[...] = buffer[offset:offset + grad.size].reshape(grad.shape)
            offset += grad.size
        self.stopping = bool(buffer[offset + 2] > 0)
        return float(buffer[offset]) / rows, int(round(float(buffer[offset + 1])))

    def _flat_buffer(self, grads):
        size = sum(g.size for g in grads) + 3
        if self._buffer is None or self._buffer.size != size:
            self._buffer = np.empty(size, grads[0].dtype)
        return self._buffer

    # --- The all-reduce -----------------------------------------------------------------------------

    def reduce_in_rank_order(self, buffer):
        """buffer = the sum of every rank's buffer, in place, the same bits on every rank and on every
        rerun: rank j receives segment j of every rank's buffer and sums them in rank order, then every
        rank gathers every segment. Each rank sends and receives 2 (N - 1) / N of the buffer."""
        if self.size == 1:
            return
        started = time.perf_counter()
        bounds = [share_bounds(buffer.size, self.size, r) for r in range(self.size)]
        start, stop = bounds[self.rank]
        received = self._received.get((buffer.size, buffer.dtype))
        if received is None:  # once per buffer: the steps allocate nothing
            width = buffer.size // self.size + 1
            received = self._received[(buffer.size, buffer.dtype)] = np.empty((self.size, width), buffer.dtype)
        requests, senders = [], []
        for peer in self._others():
            requests.append(self.comm.Irecv(received[peer, :stop - start], source=peer, tag=_REDUCE))
            senders.append(peer)
            lo, hi = bounds[peer]
            requests.append(self.comm.Isend(buffer[lo:hi], dest=peer, tag=_REDUCE))
            senders.append(peer)
        self._wait(requests, senders, "gradients")
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
            requests.append(self.comm.Irecv(buffer[lo:hi], source=peer, tag=_GATHER))
            senders.append(peer)
            requests.append(self.comm.Isend(segment, dest=peer, tag=_GATHER))
            senders.append(peer)
        self._wait(requests, senders, "summed gradients")
        self.reduce_seconds += time.perf_counter() - started

    def _others(self):
        # Starting after this rank spreads the first messages over all the peers.
        return [(self.rank + i) % self.size for i in range(1, self.size)]

    def _wait(self, requests, senders, what):
        """Wait for every request (senders[i]: the peer of requests[i]); PeerLost naming the peers whose
        messages are still pending when one of them is dead (a peer on this machine), or after
        peer_timeout seconds."""
        deadline = time.monotonic() + self.peer_timeout
        next_check = time.monotonic() + 0.005
        while not self.MPI.Request.Testall(requests):
            now = time.monotonic()
            if now < next_check:  # spin, as MPI_Wait does: a large message moves only while MPI is called
                continue
            next_check = now + 0.05
            pending = sorted({peer for request, peer in zip(requests, senders) if not request.Test()})
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
        """The loss and accuracy of `net` on `inputs` (train.EvaluationInputs) with each rank evaluating
        its share of the images: the whole set's, the same on every rank."""
        start, stop = share_bounds(len(labels), self.size, self.rank)
        mine = inputs.rows(start, stop).evaluate(net, labels[start:stop])
        count = stop - start
        loss_sum, correct = self.sum_in_rank_order(
            [mine.loss * count if count else 0.0, mine.accuracy * count if count else 0.0])
        return loss_sum / len(labels), float(round(correct)) / len(labels)
