"""A Sandblaster job on one rank: the pieces every rank shares, then its role."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...config import Config
from ...data import open_dataset
from ...errors import DbmpiError
from ...faults import Fault
from ...metrics import MetricsWriter
from ...optim.lbfgs import X, num_vectors
from ...ps.layout import ParamLayout
from ...ps.vector import VectorShard, VectorWindows
from ...topology import Role, Topology
from .coordinator import Coordinator
from .model64 import build_model
from .plan import BatchPlan
from .replica import Replica


def run(cfg: Config, topo: Topology, run_dir: Path, t0: float, checkpoint=None) -> dict | None:
    """Run Sandblaster L-BFGS on this rank; the coordinator returns the summary, others None.

    Collective over ``topo.comm``: every rank must call it.
    """
    if checkpoint is not None:
        raise DbmpiError(f"sandblaster: {run_dir} holds a Downpour checkpoint; Sandblaster "
                         "runs do not resume: choose a new run.dir")
    sb = cfg.sandblaster
    dataset = open_dataset(cfg.data.path)
    n_total = dataset.num_examples("train")
    n_train = min(sb.train_limit, n_total) if sb.train_limit else n_total
    if sb.batch_size > n_train:
        raise DbmpiError(f"sandblaster.batch_size: {sb.batch_size} is more than the "
                         f"{n_train} training examples used; lower it (0 = all of them)")
    model = build_model(cfg, dataset)
    layout = ParamLayout.even(model.num_params, cfg.topology.shards)
    win = VectorWindows(topo, layout)
    metrics = MetricsWriter(run_dir, topo.rank, t0)
    fault = Fault(topo.rank)
    plan = BatchPlan(n_train, sb.batch_size, cfg.run.seed)
    result = None
    shard = None
    if topo.role is Role.SHARD:
        init = model.init_params(cfg.run.seed).astype(np.float64)
        lo, hi = layout.block(topo.index)
        shard = VectorShard(win, num_vectors(sb.history), init[lo:hi].copy(), fault.check)
        shard.init_vector(X, init[lo:hi])
    topo.comm.Barrier()  # the shards hold the initial point before anyone fetches
    try:
        if shard is not None:
            programs = shard.serve()
            metrics.write("shard", shard=topo.index, programs=programs,
                          busy_s=round(shard.busy_s, 3),
                          push_wait_s=round(shard.push_wait_s, 3))
        elif topo.role is Role.REPLICA:
            Replica(cfg, topo, model, dataset, n_train, plan, win, metrics, fault).run()
        else:
            result = Coordinator(cfg, topo, model, dataset, plan, win, metrics, run_dir, t0,
                                 fault).run()
    finally:
        metrics.close()
    topo.comm.Barrier()  # nobody frees a window another rank still uses
    win.free()
    return result
