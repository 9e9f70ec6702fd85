"""Small, bounded probes run on a bed of namespace hosts (tests/netbed.py); one JSON line out.

Under mpiexec (``python -m mpi4py tests/netbed_probe.py MODE ...``):
    hosts            where each rank runs, COMM_TYPE_SHARED groups, a ring Send/Recv and an
                     Allreduce of seeded int64 arrays (sha256 of what arrived: the caller checks
                     them against numpy)
    bw NBYTES REPS   rank 0 <-> the last rank: NBYTES one way (best and median GB/s over REPS)
                     and 8-byte one-way latency (median of 200 round trips / 2)
    fail             the last rank raises while the others wait in a Barrier
Without MPI, raw TCP between two hosts (what the link gives before MPI):
    tcp-recv PORT NBYTES           accept one connection, read NBYTES, print the rate
    tcp-send ADDR PORT NBYTES      connect (retrying up to 10 s), send NBYTES
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

import numpy as np

N = 1 << 17  # int64 items per array: 1 MiB, above MPICH's eager limits (rendezvous over TCP)


def seeded(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(1 << 40), 1 << 40, n, dtype=np.int64)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def hosts(comm) -> None:
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    group = shared.allgather(rank)
    shared.Free()
    got = np.empty(N, np.int64)
    reqs = [comm.Isend(seeded(rank), (rank + 1) % size, tag=7),
            comm.Irecv(got, (rank - 1) % size, tag=7)]
    MPI.Request.Waitall(reqs)
    total = np.empty(N, np.int64)
    comm.Allreduce(seeded(1000 + rank), total, op=MPI.SUM)
    me = {"name": MPI.Get_processor_name(), "netns": os.readlink("/proc/self/ns/net"),
          "shared": group, "recv_sha": sha(got), "allreduce_sha": sha(total)}
    ranks = comm.gather(me, root=0)
    if rank == 0:
        print(json.dumps({"ranks": ranks}), flush=True)


def bandwidth(comm, nbytes: int, reps: int) -> None:
    rank, last = comm.Get_rank(), comm.Get_size() - 1
    buf, ack = np.ones(nbytes, np.uint8), np.zeros(8, np.uint8)

    def round_trip(out: np.ndarray) -> float:
        """Rank 0 sends ``out`` to the last rank, which answers with ``ack``: seconds."""
        t = time.perf_counter()
        if rank == 0:
            comm.Send(out, last)
            comm.Recv(ack, last)
        elif rank == last:
            comm.Recv(out, 0)
            comm.Send(ack, 0)
        return time.perf_counter() - t

    rates = []
    for _ in range(reps):
        comm.Barrier()
        rates.append(nbytes / round_trip(buf) / 1e9)
    comm.Barrier()
    lat = [round_trip(ack) / 2 * 1e6 for _ in range(200)]
    if rank == 0:
        print(json.dumps({"nbytes": nbytes, "best_GBps": max(rates),
                          "median_GBps": float(np.median(rates)),
                          "latency_us": float(np.median(lat))}), flush=True)


def fail(comm) -> None:
    comm.Barrier()
    if comm.Get_rank() == comm.Get_size() - 1:
        raise RuntimeError(f"netbed probe: rank {comm.Get_rank()} fails on purpose")
    comm.Barrier()  # never returns: the job must be aborted by mpi4py's -m runner


def tcp_recv(port: int, nbytes: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as srv:
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(30)
            buf, got, t = bytearray(1 << 20), 0, time.perf_counter()
            while got < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
            dt = time.perf_counter() - t
    print(json.dumps({"nbytes": got, "GBps": got / dt / 1e9}), flush=True)


def tcp_send(addr: str, port: int, nbytes: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        chunk = b"\0" * (1 << 20)
        for i in range(0, nbytes, len(chunk)):
            conn.sendall(chunk[:nbytes - i])


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "tcp-recv":
        return tcp_recv(int(args[0]), int(args[1]))
    if mode == "tcp-send":
        return tcp_send(args[0], int(args[1]), int(args[2]))
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if mode == "hosts":
        hosts(comm)
    elif mode == "bw":
        bandwidth(comm, int(args[0]), int(args[1]))
    elif mode == "fail":
        fail(comm)
    else:
        raise SystemExit(f"netbed_probe: unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
