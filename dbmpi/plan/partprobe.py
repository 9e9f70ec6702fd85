"""What cutting a model costs beyond its layers: CPU per message of the partitions' exchange.

    mpiexec -n P python -m dbmpi.plan.partprobe SPEC [SECONDS]

``SPEC`` is the JSON ``[input_shape, layers, classes, loss, batch]`` of the calibration. The
P ranks train the model cut in P (:class:`dbmpi.model.parallel.PartitionedModel`, the code
the training ranks run) on one synthetic batch for ``SECONDS`` (default 1.5); each times its
own layers' forward and backward in CPU time, and the exchange the CPU of its waits for the
peers. What a partition's CPU holds besides those is the exchange's own work: bookkeeping
per message in Python, copies into place, MPI's request handling. Rank 0 prints one JSON
line: ``msg_s``, that CPU per message (the mean over the partitions, each over its messages
per step, from the plan), and for information ``step_s``, ``layers_s``, ``wait_s`` (wall),
``wait_cpu_s`` and ``other_s`` per step, each partition's ``messages`` per step by the plan
and the messages it ``sent`` per step.

Run it with a core per rank (:func:`dbmpi.plan.calibrate.measure_exchange` runs P = 2 on 2
cores or more): oversubscribed, a partition's CPU holds time-sharing effects this figure
should not.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _timed(method, total: list[float]):
    """``method`` adding the CPU time of each call to ``total[0]``."""
    def call(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.thread_time() - t0
    return call


def probe(comm, spec: list, seconds: float) -> dict | None:
    import numpy as np

    from ..model.model import flat_batch
    from ..model.parallel import PartitionedModel
    from ..model.partition import PartitionPlan
    from .shape import messages

    shape, layers, classes, loss, batch = spec
    P, rank = comm.Get_size(), comm.Get_rank()
    plan = PartitionPlan(tuple(shape), layers, classes, P)
    model = PartitionedModel(plan, comm, loss, label=f"probe partition {rank}")
    model.init_params(0)
    rng = np.random.default_rng(0)
    x = flat_batch(rng.standard_normal((batch, *shape)).astype(np.float32))
    y = rng.integers(0, classes, batch)
    layer_cpu = [0.0]
    for layer in model.layers:  # instance attributes: only this probe's model is timed
        layer.forward = _timed(layer.forward, layer_cpu)
        layer.backward = _timed(layer.backward, layer_cpu)
    for _ in range(5):
        model.forward_backward(x, y)
    comm.Barrier()
    model.reset_stats()
    layer_cpu[0] = 0.0
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    go = np.ones(1, np.int8)
    while go[0]:
        model.forward_backward(x, y)
        steps += 1
        if steps % 10 == 0:  # every partition runs the same number of steps
            go[0] = time.perf_counter() - t0 < seconds
            comm.Bcast(go, root=0)
    wall = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps
    stats = model.stats()
    layers_s, wait_s = layer_cpu[0] / steps, stats["wait_s"] / steps
    msgs = messages(plan)[0][rank]
    # CPU outside the layers and the waits' polling: the exchange's own work (in CPU time
    # throughout, so that other tenants' load does not count)
    other = max(0.0, cpu - layers_s - stats["wait_cpu_s"] / steps)
    got = comm.gather((wall, layers_s, wait_s, other, other / max(msgs, 1), msgs,
                       stats["messages_sent"] / steps, stats["wait_cpu_s"] / steps), root=0)
    model.free()
    if rank != 0:
        return None
    return {"partitions": P, "steps": steps,
            "step_s": statistics.fmean(g[0] for g in got),
            "layers_s": statistics.fmean(g[1] for g in got),
            "wait_s": statistics.fmean(g[2] for g in got),
            "wait_cpu_s": statistics.fmean(g[7] for g in got),
            "other_s": statistics.fmean(g[3] for g in got),
            "msg_s": statistics.fmean(g[4] for g in got),
            "messages": [g[5] for g in got], "sent": [g[6] for g in got]}


def main(argv: list[str]) -> None:
    from mpi4py import MPI

    out = probe(MPI.COMM_WORLD, json.loads(argv[0]), float(argv[1]) if len(argv) > 1 else 1.5)
    if out is not None:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
