"""Downpour with model parallelism: what changes when a replica is P > 1 partitions.

With ``topology.partitions = P > 1`` every replica is a
:class:`~dbmpi.model.parallel.PartitionedModel` over its replica communicator. The parameter
server holds the replica's *global* vector (the partitions' vectors one after another,
:mod:`dbmpi.model.partition`), so

* each partition fetches and pushes only its own range, talking only to the shards holding it
  (it is its own PS worker);
* the shards start from the single-rank model's initial parameters in that layout;
* the coordinator fetches the global vector and converts it to the single-rank
  :class:`~dbmpi.model.Model`'s layout to evaluate and to write ``params.h5``.

The partitions of a replica read the same minibatches (same reader and seed) and take every
control decision (stop, checkpoint pause, warm-start release) on one reading of the
coordinator's flags, which partition 0 makes and broadcasts, so they always run the same
steps. With P = 1 every function here leaves things as they were.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..model.parallel import PartitionedModel
from ..model.partition import PartitionPlan


def plan_for(cfg, dataset) -> PartitionPlan | None:
    """The partition plan of the config's model on this data, or None when P = 1."""
    P = cfg.topology.partitions
    if P == 1:
        return None
    return PartitionPlan(dataset.feature_shape, cfg.model.layers, dataset.num_classes, P,
                         split=cfg.topology.split)


def param_ranges(cfg, model, dataset) -> list[tuple[int, int]]:
    """The global range of every partition (one range, the whole vector, when P = 1)."""
    plan = plan_for(cfg, dataset)
    return plan.ranges if plan else [(0, model.num_params)]


def initial_params(cfg, model, dataset) -> np.ndarray:
    """The initial global parameter vector (the single-rank model's, rearranged for P > 1)."""
    params = model.init_params(cfg.run.seed)
    plan = plan_for(cfg, dataset)
    return plan.from_model(params) if plan else params


def replica_model(cfg, topo, model, dataset):
    """The model this replica rank trains: ``model`` itself, or its partition of it.

    Collective over ``topo.comm_replica`` when P > 1.
    """
    plan = plan_for(cfg, dataset)
    if plan is None:
        return model
    return PartitionedModel(plan, topo.comm_replica, cfg.model.loss,
                            label=f"replica {topo.index} partition {topo.partition}")


class SingleRankClient:
    """A PS client over the whole global vector whose ``fetch`` hands back the single-rank
    Model's layout (the coordinator's view when replicas are partitioned)."""

    def __init__(self, client, plan: PartitionPlan):
        self.client = client
        self.plan = plan
        self._global = np.zeros(plan.num_params, dtype=np.float32)

    def fetch(self, params: np.ndarray, read_own_pushes: bool = False) -> None:
        self.client.fetch(self._global, read_own_pushes)
        self.plan.to_model(self._global, out=params)

    def __getattr__(self, name):
        return getattr(self.client, name)


def coordinator_client(client, cfg, dataset):
    """``client`` itself (P = 1), or a view of it that fetches in the single-rank layout."""
    plan = plan_for(cfg, dataset)
    return client if plan is None else SingleRankClient(client, plan)


def agree(topo, head: np.ndarray) -> np.ndarray:
    """Give every partition of this replica partition 0's reading of the coordinator's flags
    (collective over the replica; nothing to do when P = 1)."""
    if topo.cfg.partitions > 1:
        topo.comm_replica.Bcast(head, root=0)
    return head


def train_fields(model, topo, steps: int) -> dict | None:
    """Extra fields of a ``train`` record, or None on partitions that do not write it.

    P > 1: collective over the replica; partition 0 gets ``partition_bytes``, the bytes all
    partitions of the replica sent each other per step over the last ``steps`` steps, and
    ``partition_wait_s``, the longest a partition waited for its peers per step.
    """
    if not isinstance(model, PartitionedModel):
        return {}
    st = model.stats()
    model.reset_stats()
    sent = topo.comm_replica.reduce(st["bytes_sent"], op=MPI.SUM, root=0)
    wait = topo.comm_replica.reduce(st["wait_s"], op=MPI.MAX, root=0)
    if topo.partition != 0:
        return None
    steps = max(steps, 1)
    return {"partition_bytes": round(sent / steps),
            "partition_wait_s": round(wait / steps, 6)}
