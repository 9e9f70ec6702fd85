"""PS path bandwidth, run under mpiexec by benchmarks/downpour.py (1 coordinator, S shards,
1 worker): fetch and push through the shards against raw one-sided Get / Put / Accumulate of
the same bytes on the same windows (Win.Allocate, Lock_all(MODE_NOCHECK), Flush).

``push`` is sustained: back-to-back pushes of a gradient held in the worker's own array, each
copied into a slot of the worker's window that is reused only after the shards pulled it and
applied Adagrad to it, so it includes the shards' optimizer step. ``push_inplace`` is the same
with the gradient accumulated straight in the slot (``PSClient.push_buffer``, as Downpour does
for n_push > 1). ``push_post`` is one push while a slot is free: what a replica waits for.
The raw baselines Get from the shards' parameter window and Put / Accumulate into a window of
the same size on the shards.

``raw_send``/``raw_recv`` are two-sided MPI (``Send``/``Recv``) of the same bytes between the
worker and each shard, before the parameter server starts: the link's own bandwidth.
``--compute-ms`` adds the time from a push's start to its application by every shard while the
worker computes that long without calling MPI (the shard stamps each apply): over TCP a push
pulled from the worker's memory waited for its compute; one in the shard's inbox does not.

    mpiexec -n 4 python -m mpi4py benchmarks/_ps_bandwidth.py --params 41777152 --shards 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from dbmpi.config import TopologyConfig
from dbmpi.optim import Adagrad
from dbmpi.ps import ParameterServer, ParamLayout, PSClient, ShardService
from dbmpi.ps.rma import Window
from dbmpi.ps.server import request_stop
from dbmpi.topology import Role, Topology


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=41_777_152)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compute-ms", type=float, nargs="*", default=[])
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    topo = Topology.create(TopologyConfig(shards=args.shards, replicas=1), comm)
    n = args.params
    layout = ParamLayout.even(n, args.shards)
    ps = ParameterServer(topo, layout, [(0, n)])
    is_shard = topo.role is Role.SHARD
    sink = Window(comm, layout.block_size(topo.index) if is_shard else 0, np.float32, "sink")
    service = None
    raw_two_sided = _two_sided(comm, topo, layout, args.repeats)
    applied_at: list[float] = []  # when each of my applies finished (shards)
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        service = ShardService(ps, Adagrad(1e-4), np.zeros(hi - lo, np.float32))
        plain_apply = service._apply_push

        def stamped_apply(w, slot):
            plain_apply(w, slot)
            applied_at.append(time.monotonic())
        service._apply_push = stamped_apply
    comm.Barrier()
    out = None
    if topo.role is Role.COORDINATOR:
        # idle for the whole measurement: wait without polling MPI, as dbmpi's coordinator
        # does (a rank spinning in Barrier takes a core from the shards on a small machine)
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.005)
    if service is not None:
        service.serve()
        comm.Ibarrier().Wait()
    elif topo.role is Role.REPLICA:
        client = PSClient(ps, 0, n, worker=0, replica=0)
        params = np.empty(n, np.float32)
        grads = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 1e-3
        segs = layout.segments(0, n)

        def raw(op):
            for seg in segs:
                target = topo.shard_rank(seg.shard)
                part = (params if op == "get" else grads)[seg.start:seg.stop]
                if op == "get":
                    ps.params.get(part, target, seg.offset)
                elif op == "put":
                    sink.put(part, target, seg.offset)
                else:
                    sink.accumulate(part, target, seg.offset)
            for seg in segs:
                (ps.params if op == "get" else sink).flush(topo.shard_rank(seg.shard))

        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        pushes = 4
        samples = {k: [] for k in ("raw_get", "fetch", "raw_put", "raw_accumulate", "push",
                                   "push_inplace", "push_post")}
        for _ in range(args.repeats):
            samples["raw_get"].append(timed(lambda: raw("get")))
            samples["fetch"].append(timed(lambda: client.fetch(params)))
            samples["raw_put"].append(timed(lambda: raw("put")))
            samples["raw_accumulate"].append(timed(lambda: raw("accumulate")))

            def push_many():
                for _ in range(pushes):
                    client.push(grads)
                client.wait_acknowledged()
            samples["push"].append(timed(push_many) / pushes)

            def push_many_inplace():
                for _ in range(pushes):
                    client.push(client.push_buffer())  # the gradient already in the slot
                client.wait_acknowledged()
            samples["push_inplace"].append(timed(push_many_inplace) / pushes)
            # one push with its slot free: the Put and the post, without the shard's apply
            samples["push_post"].append(timed(lambda: client.push(grads)))
            client.wait_acknowledged()
        posted = {}  # compute ms -> post times of its pushes
        for ms in args.compute_ms:
            client.wait_acknowledged()
            posted[ms] = []
            for _ in range(args.repeats):
                posted[ms].append(time.monotonic())  # the push starts
                client.push(grads)
                t = time.perf_counter()
                while time.perf_counter() - t < ms / 1e3:  # compute, no MPI call
                    np.dot(grads[:4096], grads[:4096])
                client.wait_acknowledged()
        request_stop(ps)
        comm.Ibarrier().Wait()
        nbytes = 4 * n
        med = {k: statistics.median(v) for k, v in samples.items()}
        out = {"params": n, "bytes": nbytes, "shards": args.shards,
               "seconds": med, "GB_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
               "fetch_vs_raw_get": med["raw_get"] / med["fetch"],
               "push_vs_raw_accumulate": med["raw_accumulate"] / med["push"],
               "push_vs_raw_put": med["raw_put"] / med["push"],
               "push_inplace_vs_raw_accumulate": med["raw_accumulate"] / med["push_inplace"],
               "push_post_vs_raw_accumulate": med["raw_accumulate"] / med["push_post"]}
        out.update(raw_two_sided)
        out["fetch_vs_raw_recv"] = out["seconds_two_sided"]["recv"] / med["fetch"]
        out["push_post_vs_raw_send"] = out["seconds_two_sided"]["send"] / med["push_post"]
        out["posted"] = posted
    comm.Barrier()
    # every shard's apply times; a push counts as applied when its last shard applied it
    stamps = comm.gather(applied_at if topo.role is Role.SHARD else None, root=0)
    sink.free()
    ps.free()
    results = comm.gather(out, root=0)
    if comm.Get_rank() == 0:
        res = next(r for r in results if r)
        shard_stamps = [s for s in stamps if s is not None]
        posted = res.pop("posted")
        k0 = len(shard_stamps[0]) - sum(len(v) for v in posted.values())
        res["apply_latency_s"] = {}
        for ms, times in posted.items():
            lat = [max(s[k0 + i] for s in shard_stamps) - t for i, t in enumerate(times)]
            res["apply_latency_s"][str(ms)] = statistics.median(lat)
            k0 += len(times)
        print(json.dumps(res))


def _two_sided(comm, topo, layout, repeats: int) -> dict:
    """Median seconds of Send (worker -> shards, until each shard acknowledged receipt) and
    Recv (shards -> worker) of the vector, each shard's block in one message, before the
    parameter server runs."""
    worker = topo.worker_rank(0)
    times = {"send": [], "recv": []}
    ack = np.zeros(1, np.int32)
    for _ in range(repeats):
        for way in ("send", "recv"):
            comm.Barrier()
            t = time.perf_counter()
            if topo.role is Role.SHARD:
                block = np.empty(layout.block_size(topo.index), np.float32)
                if way == "send":
                    comm.Recv(block, worker, 7)
                    comm.Send(ack, worker, 8)
                else:
                    comm.Send(block, worker, 7)
            elif topo.role is Role.REPLICA:
                vec = np.zeros(layout.total, np.float32)
                reqs = []
                for s in range(layout.num_shards):
                    lo, hi = layout.block(s)
                    part, peer = vec[lo:hi], topo.shard_rank(s)
                    reqs.append(comm.Isend(part, peer, 7) if way == "send"
                                else comm.Irecv(part, peer, 7))
                    if way == "send":
                        reqs.append(comm.Irecv(np.zeros(1, np.int32), peer, 8))
                MPI.Request.Waitall(reqs)
                times[way].append(time.perf_counter() - t)
    if topo.role is not Role.REPLICA:
        return {}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds_two_sided": med,
            "GB_per_s_two_sided": {k: 4 * layout.total / v / 1e9 for k, v in med.items()}}


if __name__ == "__main__":
    main()
