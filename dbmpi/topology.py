"""Split COMM_WORLD into the roles of a DistBelief job.

World ranks are laid out as::

    rank 0                      coordinator (evaluation, stopping, Sandblaster's driver)
    ranks 1 .. S                parameter-server shards 0 .. S-1
    ranks 1+S+r*P .. 1+S+r*P+P-1  replica r, model partitions 0 .. P-1

Communicators: ``comm_shards`` holds the S shards, ``comm_replica`` the P partitions of one
replica, ``comm_workers`` every replica rank (all partitions of all replicas). A rank outside a
group holds ``MPI.COMM_NULL`` there. This module knows nothing about layers or parameters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mpi4py import MPI

from .config import TopologyConfig
from .errors import TopologyError


@enum.unique
class Role(enum.IntEnum):
    COORDINATOR = 0
    SHARD = 1
    REPLICA = 2


COORDINATOR_RANK = 0


def role_of(cfg: TopologyConfig, rank: int, coordinator: bool = True) -> tuple[Role, int, int]:
    """(role, index, partition) of a world rank; index is the shard or replica number."""
    base = 1 if coordinator else 0
    if coordinator and rank == COORDINATOR_RANK:
        return Role.COORDINATOR, 0, 0
    if rank < base + cfg.shards:
        return Role.SHARD, rank - base, 0
    r, p = divmod(rank - base - cfg.shards, cfg.partitions)
    return Role.REPLICA, r, p


def check_world_size(cfg: TopologyConfig, size: int, coordinator: bool = True) -> None:
    """Raise a one-line error unless ``size`` is exactly what the config needs."""
    need = cfg.world_size - (0 if coordinator else 1)
    if size != need:
        raise TopologyError(
            f"the config needs {need} MPI ranks (1 coordinator + {cfg.shards} shards + "
            f"{cfg.replicas} replicas x {cfg.partitions} partitions) but this job has {size}: "
            f"run `mpiexec -n {need} ...` or `python -m dbmpi launch CONFIG`, or change "
            f"[topology] to fit {size} ranks")


@dataclass
class Topology:
    """This rank's place in the job and the communicators it takes part in."""

    cfg: TopologyConfig
    comm: MPI.Comm  # the world communicator the job runs on
    role: Role
    index: int  # shard number or replica number (0 for the coordinator)
    partition: int  # model partition within the replica (0 otherwise)
    comm_shards: MPI.Comm
    comm_replica: MPI.Comm
    comm_workers: MPI.Comm
    has_coordinator: bool = True

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def label(self) -> str:
        """Short role name for log prefixes: ``coordinator``, ``shard 1``, ``replica 0``."""
        if self.role is Role.COORDINATOR:
            return "coordinator"
        if self.role is Role.SHARD:
            return f"shard {self.index}"
        if self.cfg.partitions > 1:
            return f"replica {self.index}.{self.partition}"
        return f"replica {self.index}"

    def shard_rank(self, shard: int) -> int:
        """Rank (in ``comm``) of parameter-server shard ``shard``."""
        return int(self.has_coordinator) + shard

    def worker_rank(self, replica: int, partition: int = 0) -> int:
        """Rank (in ``comm``) of ``partition`` of ``replica``."""
        return (int(self.has_coordinator) + self.cfg.shards + replica * self.cfg.partitions
                + partition)

    @property
    def num_workers(self) -> int:
        return self.cfg.replicas * self.cfg.partitions

    @property
    def worker_id(self) -> int:
        """Index of this worker among all workers (replica-major), -1 off replicas."""
        if self.role is not Role.REPLICA:
            return -1
        return self.index * self.cfg.partitions + self.partition

    @classmethod
    def create(cls, cfg: TopologyConfig, comm: MPI.Comm = MPI.COMM_WORLD,
               coordinator: bool = True) -> "Topology":
        """Collective over ``comm``: check its size and split it into role communicators.

        ``coordinator=False`` leaves the coordinator out (shards start at rank 0): the
        parameter server alone needs none, which lets its tests run on 2 ranks.
        """
        check_world_size(cfg, comm.Get_size(), coordinator)
        role, index, partition = role_of(cfg, comm.Get_rank(), coordinator)
        undef = MPI.UNDEFINED
        comm_shards = comm.Split(0 if role is Role.SHARD else undef, index)
        comm_workers = comm.Split(0 if role is Role.REPLICA else undef, comm.Get_rank())
        comm_replica = comm.Split(index if role is Role.REPLICA else undef, partition)
        return cls(cfg, comm, role, index, partition, comm_shards, comm_replica, comm_workers,
                   coordinator)

    def free(self) -> None:
        for c in (self.comm_shards, self.comm_replica, self.comm_workers):
            if c != MPI.COMM_NULL:
                c.Free()
