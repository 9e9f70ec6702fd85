"""Latency, bandwidth and CPU per byte between ranks 0 and 1 (run under mpiexec -n 2).

    mpiexec -n 2 python -m dbmpi.plan.linkprobe [--mib 8]

Rank 0 prints one JSON line: ``latency_s`` (half the median round trip of 8 bytes),
``bandwidth`` (bytes/s of ``--mib`` MiB Send/Recv, median of round trips, one way) and, for
information, ``cpu_s_per_byte_with_polling`` (both ranks' CPU time over the bandwidth part
per byte: on a slow link mostly the waiting rank's polling, so the model does not use it).
With ``--gang G``: see :func:`gang`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def probe(comm, mib: float, pings: int = 200, rounds: int = 7) -> dict | None:
    import numpy as np

    rank = comm.Get_rank()
    small = np.zeros(2, dtype=np.float32)
    big = np.ones(int(mib * 2**20) // 4, dtype=np.float32)
    comm.Barrier()
    rtts = _round_trips(comm, small, pings, skip=10)
    comm.Barrier()
    c0 = time.process_time()
    trips = _round_trips(comm, big, rounds, skip=1)
    cpu = comm.gather(time.process_time() - c0, root=0)
    if rank != 0:
        return None
    moved = 2 * rounds * big.nbytes
    return {"latency_s": statistics.median(rtts) / 2,
            "bandwidth": 2 * big.nbytes / statistics.median(trips),
            "cpu_s_per_byte_with_polling": (cpu[0] + cpu[1]) / moved}


def _round_trips(comm, buf, count: int, skip: int) -> list[float]:
    """Seconds of ``count`` round trips of ``buf`` between ranks 0 and 1 (after ``skip``
    warm-up trips); other ranks take no part."""
    rank, out = comm.Get_rank(), []
    for i in range(count + skip):
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send(buf, 1)
            comm.Recv(buf, 1)
        elif rank == 1:
            comm.Recv(buf, 0)
            comm.Send(buf, 0)
        if i >= skip:
            out.append(time.perf_counter() - t0)
    return out


def gang(comm, size: int, compute_s: float = 0.002, iters: int = 150) -> dict | None:
    """Ranks 0..size-1 compute ``compute_s`` then all-gather, in lockstep, as the partitions
    of a replica do at every layer; the other ranks poll a window as an idle shard does.
    Between steps each member makes the control operations a worker makes on a shard per
    step (an atomic read of the counters, then a ``Fetch_and_op``; :mod:`dbmpi.ps.client`)
    on one of the polling ranks, timed apart from the step.
    Returns (rank 0) the median extra seconds per synchronisation over computing alone, the
    median seconds of one control operation over the members (``ctrl_op_s``), and the share
    of a core the polling ranks took (``poll_cores``)."""
    import numpy as np
    from mpi4py import MPI

    from ..ps.rma import Window

    rank = comm.Get_rank()
    member = rank < size
    ctrl = Window(comm, 0 if member else 16, np.int64, "probe-ctrl")
    sub = comm.Split(0 if member else MPI.UNDEFINED, rank)
    if not member:
        comm.send(_poll_like_a_shard(comm, ctrl), dest=0, tag=10)
        ctrl.free()
        return None
    a = np.ones((96, 96), np.float32)

    def work(seconds: float) -> float:
        t0 = time.thread_time()
        while time.thread_time() - t0 < seconds:  # CPU time: the same work however shared
            a @ a
        return time.thread_time() - t0

    out = np.zeros(size, np.float64)
    steps, cpu, ops = [], [], []
    counters = np.zeros(16, np.int64)
    poller = size + rank % max(comm.Get_size() - size, 1)
    for i in range(iters + 10):
        t0 = time.perf_counter()
        c = work(compute_s)
        sub.Allgather(np.array([c]), out)
        t1 = time.perf_counter()
        if poller < comm.Get_size():
            ctrl.read(counters, poller)
            ctrl.fetch_and_op(0, poller, 15)
        if i >= 10:
            steps.append(t1 - t0)
            cpu.append(float(out.max()))
            ops.append((time.perf_counter() - t1) / 2)
    op_s = sub.gather(statistics.fmean(ops), root=0)  # the mean: rare long waits count
    sub.Free()
    polls = []
    if rank == 0:
        for r in range(size, comm.Get_size()):
            comm.send(None, dest=r, tag=9)
        polls = [comm.recv(source=r, tag=10) for r in range(size, comm.Get_size())]
    ctrl.free()
    if rank != 0:
        return None
    return {"gang": size, "others": comm.Get_size() - size,
            "step_s": statistics.median(steps), "compute_s": statistics.median(cpu),
            "ctrl_op_s": statistics.median(op_s) if polls else 0.0,
            "poll_cores": statistics.median(polls) if polls else 0.0}


def _poll_like_a_shard(comm, ctrl, push_every_s: float = 0.01) -> float:
    """The idle loop of :meth:`dbmpi.ps.ShardService.serve` (two reads of its counters per
    poll, the same backoff, woken by a push every ``push_every_s``) until rank 0 says stop;
    returns its CPU time over its wall time."""
    import numpy as np

    from ..ps.rma import progress
    from ..ps.server import Backoff

    mine = np.zeros(16, np.int64)
    backoff = Backoff(first=5e-4)
    c0, t0 = time.process_time(), time.perf_counter()
    next_push = t0 + push_every_s
    while not comm.Iprobe(source=0, tag=9):
        for _ in range(2):  # poll(), then stop_requested()
            progress()
            ctrl.sync()
            np.copyto(mine, ctrl.local)
        if time.perf_counter() >= next_push:
            backoff.reset()
            next_push += push_every_s
        backoff.wait()
    comm.recv(source=0, tag=9)
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=8.0, help="message size (default 8 MiB)")
    ap.add_argument("--gang", type=int, default=0,
                    help="instead: a lockstep gang of this many ranks, the rest wake often")
    args = ap.parse_args()
    from mpi4py import MPI

    if args.gang:
        out = gang(MPI.COMM_WORLD, args.gang)
    else:
        out = probe(MPI.COMM_WORLD, args.mib)
    if out is not None:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
