"""Messages between the partitions of one replica (:mod:`dbmpi.model.parallel`), with a deadline.

Every message is a buffer-based ``Isend``/``Irecv`` (tag = layer and direction) whose peers come
from the plan: each layer declares whom it receives from and sends to. Waits poll with a
deadline (``DBMPI_PARTITION_TIMEOUT_S``, default 120 s), yielding the core between polls for
a few milliseconds (0.2 ms when the job has more ranks than cores), then sleeping with
backoff so that oversubscribed ranks give up the core,
and a message that never arrives, or a
send that is never received, raises :class:`PartitionError` naming both partitions instead
of hanging. At the end of the forward pass and of the backward pass each partition probes for
messages of that pass still pending from any peer: a message nobody expected (the partitions
disagree on the plan) is an error too. Tags carry the parity of the pass: a peer may already
be one pass ahead (its next batch's first halo can arrive while this partition checks), never
two, because every forward pass all-gathers the logits between every pair of partitions.

Bytes sent between partitions are counted per message (``bytes_sent``, ``messages_sent``),
and the time spent waiting for peers (``wait_s``; ``wait_cpu_s`` the CPU of it); cumulative,
read and reset by the caller.
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

DEFAULT_TIMEOUT_S = 120.0


class PartitionError(RuntimeError):
    """Partitions of a replica disagree: a message missing, unexpected, or never received."""


def _tag(layer: int, backward: bool, parity: int) -> int:
    """Tags by layer, direction and the parity of the pass: a peer may already be one pass
    ahead (e.g. sending the next batch's first halo while this partition checks the last),
    never two (every pass all-gathers the logits between every pair of partitions)."""
    return 1 + 4 * layer + 2 * int(backward) + parity


class Block:
    """Columns ``[c0, c0 + width)`` of a ``(B, row)`` float32 matrix as one MPI message (a vector
    datatype: B runs of ``width`` floats, ``row`` apart), so that halos are sent straight from
    and received straight into the slab buffers the kernels read."""

    __slots__ = ("nbytes", "spec")

    def __init__(self, base: np.ndarray, c0: int, width: int, dtype: MPI.Datatype):
        self.spec = [base.reshape(-1)[c0:], 1, dtype]
        self.nbytes = base.shape[0] * width * base.itemsize


def _spec(buf) -> tuple:
    """(mpi4py buffer spec, payload bytes) of an array or a :class:`Block`."""
    if isinstance(buf, Block):
        return buf.spec, buf.nbytes
    return buf, buf.nbytes


class Exchange:
    """Point-to-point messages between the partitions of one replica, with a deadline.

    ``comm`` is a private duplicate of the replica communicator, so no other traffic can
    match these tags.
    """

    def __init__(self, comm: MPI.Comm, names: list[str], timeout_s: float | None = None,
                 spin_s: float = 2e-4, max_sleep_s: float = 2e-4, label: str = ""):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.names = names  # layer names by index, for messages
        env = os.environ.get("DBMPI_PARTITION_TIMEOUT_S")
        self.timeout_s = float(timeout_s if timeout_s is not None
                               else env if env else DEFAULT_TIMEOUT_S)
        self.spin_s, self.max_sleep_s = spin_s, max_sleep_s
        self.label = label or f"partition {self.rank}"
        self.bytes_sent = 0
        self.messages_sent = 0
        self.bytes_received = 0
        self.wait_s = 0.0
        self.wait_cpu_s = 0.0  # the CPU those waits took (polling; the rest slept)
        self.passes = {False: 0, True: 0}  # forward and backward passes completed
        self._deferred: list = []  # sends of this pass not known to be complete

    def _what(self, layer: int, backward: bool) -> str:
        name = self.names[layer] if layer < len(self.names) else "logits all-gather"
        return f"{name} {'backward' if backward else 'forward'}"

    def start(self, layer: int, backward: bool, sends: list[tuple[int, object]],
              recvs: list[tuple[int, object]]) -> list:
        """Post the receives, then the sends; return what :meth:`wait` needs. Each buffer is
        a contiguous array or a :class:`Block` (a column block of a wider matrix)."""
        tag = self.tag(layer, backward)
        pending = []
        for peer, buf in recvs:
            spec, nbytes = _spec(buf)
            pending.append((self.comm.Irecv(spec, source=peer, tag=tag), "recv", peer, nbytes,
                            layer, backward))
            self.bytes_received += nbytes
        for peer, buf in sends:
            spec, nbytes = _spec(buf)
            pending.append((self.comm.Isend(spec, dest=peer, tag=tag), "send", peer, nbytes,
                            layer, backward))
            self.bytes_sent += nbytes
            self.messages_sent += 1
        return pending

    def tag(self, layer: int, backward: bool) -> int:
        return _tag(layer, backward, self.passes[backward] & 1)

    def wait(self, pending: list) -> None:
        """Complete the receives of ``pending``, or raise :class:`PartitionError` at the
        deadline. Its sends complete by the end of the pass (:meth:`end_pass`): their buffers
        are not written again before then, and a partition that has what it needs goes on
        without waiting for its peers to take what they need (they copy it themselves)."""
        recvs = []
        for item in pending:
            (recvs if item[1] == "recv" else self._deferred).append(item)
        self._complete(recvs)

    def _complete(self, pending: list) -> None:
        """Complete every request of ``pending``, or raise at the deadline.

        Polls, yielding the core between polls (``os.sched_yield``: free when nothing else
        wants the core, so a peer's message is seen within microseconds), for ``spin_s``; then
        sleeps with backoff (oversubscribed ranks, long waits)."""
        if not pending:
            return
        reqs = [p[0] for p in pending]
        if MPI.Request.Testall(reqs):
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        deadline = t0 + self.timeout_s
        delay = 0.0
        while not MPI.Request.Testall(reqs):
            now = time.perf_counter()
            if now - t0 < self.spin_s:
                os.sched_yield()
                continue
            if now > deadline:
                self._fail(pending, reqs)
            time.sleep(delay)
            delay = min(self.max_sleep_s, delay * 2 if delay else 1e-5)
        self.wait_s += time.perf_counter() - t0
        self.wait_cpu_s += time.thread_time() - c0

    def _fail(self, pending: list, reqs: list) -> None:
        stuck = []
        for (req, kind, peer, nbytes, layer, backward), r in zip(pending, reqs):
            if r != MPI.REQUEST_NULL and not r.Test():
                stuck.append((r, kind, peer, nbytes, layer, backward))
        deferred = [p[0] for p in self._deferred]
        self._deferred.clear()
        for r in [r for r, *_ in stuck] + deferred:  # leave the communicator clean
            try:
                if not r.Test():
                    r.Cancel()
                    r.Wait()
            except MPI.Exception:  # pragma: no cover - MPI may refuse to cancel a send
                pass
        parts = []
        for _, kind, peer, nbytes, layer, backward in stuck:
            what = self._what(layer, backward)
            if kind == "recv":
                parts.append(f"the {nbytes}-byte message from partition {peer} for {what} "
                             f"(tag {self.tag(layer, backward)}) never came")
            else:
                parts.append(f"the {nbytes}-byte message to partition {peer} for {what} "
                             f"(tag {self.tag(layer, backward)}) was never received")
        raise PartitionError(
            f"{self.label}: after {self.timeout_s:g} s {'; '.join(parts)}: the partitions of "
            f"this replica disagree on the model plan or a partition stopped early "
            f"(DBMPI_PARTITION_TIMEOUT_S sets the deadline)")

    def end_pass(self, layers: range, backward: bool) -> None:
        """The end-of-pass check: complete this pass's sends (raise if one is never received),
        raise if a message of this pass is still pending here (nobody expected it); then count
        the pass."""
        if self._deferred:
            sends, self._deferred = self._deferred, []
            self._complete(sends)
        status = MPI.Status()
        for layer in layers:
            tag = self.tag(layer, backward)
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
                raise PartitionError(
                    f"{self.label}: end of the {'backward' if backward else 'forward'} pass "
                    f"with an unexpected {status.Get_count(MPI.BYTE)}-byte message from "
                    f"partition {status.Get_source()} for {self._what(layer, backward)} (tag "
                    f"{tag}) that nobody received: the partitions of this replica disagree on "
                    f"the model plan")
        self.passes[backward] += 1
