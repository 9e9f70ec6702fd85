"""The cost model: predicted time of one Downpour step and one Sandblaster iteration.

Pure arithmetic, no MPI and no timing: every rate comes from a :class:`Machine` and
:class:`Link` (measured by :mod:`dbmpi.plan.calibrate`, or written by hand in tests) and every
size from a :class:`Replica` (what one model replica computes and moves per step, counted by
:func:`dbmpi.plan.shape.replica` from the model's own layer specs).

A Downpour replica repeats: fetch (every ``n_fetch`` steps) + compute (with the activation
exchange between its partitions) + post a push (every ``n_push`` steps; the shard pulls and
applies it while the replica computes on). Alone, a replica's step takes
:attr:`Prediction.step_alone_s`. Replicas then share resources, and the job cannot go faster
than the busiest resource allows (operational analysis: for each resource k with capacity c_k
and demand D_k seconds per round of one step of every replica, steps/s per replica <=
c_k / D_k):

* the **cores** of a machine: every worker rank's compute, copies and TCP work, every shard's
  apply and pulls, the coordinator's share. This is what makes a 5-rank job on 2 cores slower
  per replica than a 2-rank one: ranks beyond the cores share them (waiting ranks yield, see
  docs/performance.md, so they take no core);
* each **shard** (one rank: applies its slice of every push, one chunk after another);
* each host's **NIC** (fetches leave the ps host, pushes enter it; one resource for both
  directions, as measured on the test bed).

Partitions of a replica run in lockstep and pay, per message of their exchange, the link and
a measured CPU cost (``Machine.exchange_msg_s``). When ranks outnumber cores, the shards' and
coordinator's work on the machine lands on the replica's critical path, partitions beyond
the cores time-share them (the cores' bound), and each synchronisation adds a measured gap
while the last partition to wake catches up (:meth:`Machine.sync_wait`), during which the
cores idle.

Predicted steps/s per replica = min(1 / step_alone, min_k c_k / D_k); the argmin names the
bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FLOAT = 4  # bytes of a float32 parameter
# Seconds a shard with workers on other hosts keeps calling MPI after each push it applies
# (dbmpi.ps.server.HOT_S: a Put aimed at it advances only while it is in MPI): CPU it burns.
SHARD_HOT_S = 0.005


@dataclass(frozen=True)
class Link:
    """A path between two ranks: one-way latency, bandwidth (bytes/s) and the CPU its stack
    spends per byte (TCP; 0 for shared memory, whose copies count as the ranks' compute)."""

    latency_s: float
    bandwidth: float
    cpu_s_per_byte: float = 0.0

    @classmethod
    def of(cls, d: dict, cpu_s_per_byte: float = 0.0) -> Link:
        return cls(float(d["latency_s"]), float(d["bandwidth"]), cpu_s_per_byte)

    def time(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Machine:
    """One host's measured rates (one thread each)."""

    cores: int
    gflops: float  # sgemm per core
    copy_bw: float  # bytes/s one core moves in a shared-memory fetch or exchange
    apply_bw: float  # parameter bytes/s one shard applies Adagrad over (from memory)
    co_run: float  # compute rate per core when every core computes (shared cache/memory) / alone
    step_overhead_s: float  # per step and worker, outside the layers (reader, protocol)
    coordinator_cores: float  # share of a core the coordinator takes
    shm: Link  # between ranks of one host
    # (busy ranks per core, extra seconds per synchronisation of a replica's partitions
    # beyond their time-sharing of the cores): measured lockstep gangs with polling ranks
    # beside them (a partition that wakes late holds up the rest while cores idle)
    oversub_sync: tuple[tuple[float, float], ...] = ()
    shard_poll_cores: float = 0.0  # share of a core an idle shard's polling takes
    # (busy ranks per core, seconds of one control operation (an atomic read or
    # Fetch_and_op of a shard's counters) with polling ranks beside): measured as sync waits
    ctrl_ops: tuple[tuple[float, float], ...] = ()
    # CPU seconds a partition spends per message of its exchange beyond the link's time (our
    # bookkeeping per message, copies into place, MPI's request handling): measured with the
    # model's own partitions (dbmpi.plan.partprobe)
    exchange_msg_s: float = 0.0

    def sync_wait(self, busy_per_core: float, crowded: bool = True) -> float:
        """Extra seconds per partition synchronisation with ``busy_per_core`` computing ranks
        per core: 0 while every rank has a core of its own (``crowded`` False); else linear
        through the measured points, the first held below it, the last segment extended."""
        return _through(self.oversub_sync, busy_per_core) if crowded else 0.0

    def ctrl_op(self, busy_per_core: float, crowded: bool = True) -> float:
        """Seconds of one control operation on a shard of this host: a round trip of the
        shared-memory link while every rank has a core, else as measured (:meth:`sync_wait`)."""
        if not crowded or not self.ctrl_ops:
            return 2 * self.shm.latency_s
        return _through(self.ctrl_ops, busy_per_core)


def _through(points, x: float) -> float:
    """Linear through measured (x, y) points, the first held below them, the last segment
    extended above; 0 without points."""
    pts = sorted(points)
    if not pts:
        return 0.0
    if x <= pts[0][0] or len(pts) == 1:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return max(0.0, y1 + (y1 - y0) * (x - x1) / (x1 - x0))


@dataclass(frozen=True)
class Replica:
    """What one model replica of ``partitions`` ranks does per step of ``batch`` examples."""

    partitions: int
    batch: int
    params: int  # the whole replica's parameters
    part_params: int  # the largest partition's parameters (what it fetches and pushes)
    compute_s: float  # one step, alone on one core: layers' time summed, slowest partition
    cpu_s: float  # all partitions' layer time per step (core-seconds)
    exchange_bytes: int  # the busiest partition's sends per step (forward + backward)
    exchange_msgs: int  # and its messages per step (sends + receives)
    syncs: int = 0  # points per step where the partitions wait for each other
    overhead_s: float = 0.0  # per step and partition outside the layers (the data reader)


@dataclass(frozen=True)
class Job:
    """A Downpour job: 1 coordinator + ``shards`` + ``replicas`` x ``partitions`` ranks."""

    shards: int
    replicas: int
    partitions: int = 1
    n_fetch: int = 1
    n_push: int = 1
    hosts: int = 1
    cores_per_host: int = 1
    link: Link | None = None  # between hosts (None: one host)
    shared_cores: bool = False  # the hosts are namespaces of one machine: one pool of cores
    background_cores: float = 0.0  # cores each machine's other tenants keep busy
    # share of a running rank's time a hypervisor gives other virtual machines (steal time,
    # dbmpi.plan.procstat; 0 on bare metal): every rank's CPU work runs 1 / (1 - steal) slower
    steal: float = 0.0
    # the machine's pace against its calibration, steal aside (a VM whose neighbours share
    # its physical cores or memory runs slower with no steal to show for it; measured by
    # timing the model's step alone around a job, benchmarks/plan.py): CPU work x 1 / pace
    pace: float = 1.0

    @property
    def ranks(self) -> int:
        return 1 + self.shards + self.replicas * self.partitions


@dataclass
class Prediction:
    job: Job
    step_s: float  # one step of one replica, sharing included
    step_alone_s: float
    breakdown: dict[str, float]  # seconds per step alone: compute, exchange, fetch, push, overhead
    utilisation: dict[str, float]  # resource -> busy fraction at the predicted rate
    bytes_per_step: dict[str, float]  # link -> bytes per replica step
    bottleneck: str
    samples_per_s_replica: float = 0.0
    samples_per_s: float = 0.0
    ps_utilisation: float = 0.0  # the busiest shard's busy fraction
    notes: list[str] = field(default_factory=list)


def _placement(job: Job):
    """Host index of every shard and of every replica, as ``dbmpi launch --hosts`` places them
    (the real planner, with the first host as the only ps host)."""
    from ..placement import Host, plan

    hosts = [Host(f"h{i}", job.cores_per_host) for i in range(job.hosts)]
    places = plan(job.shards, job.replicas, job.partitions, hosts, oversubscribe=True)
    index = {h.name: i for i, h in enumerate(hosts)}
    shard_host = [index[p.host] for p in places if p.role == "shard"]
    replica_host = [0] * job.replicas
    for p in places:
        if p.role == "replica":
            replica_host[p.index] = index[p.host]
    return shard_host, replica_host


def _co_run(m: Machine, busy: float) -> float:
    """Per-core efficiency with ``busy`` computing ranks on a machine: 1 alone, m.co_run once
    every core computes (linear in between)."""
    if busy <= 1 or m.cores <= 1:
        return 1.0
    return 1.0 - (1.0 - m.co_run) * min(busy - 1, m.cores - 1) / (m.cores - 1)


def downpour(rep: Replica, job: Job, m: Machine) -> Prediction:
    """Predicted Downpour step of ``rep`` under ``job`` on machines like ``m``."""
    if job.partitions != rep.partitions:
        raise ValueError(f"the replica is cut in {rep.partitions}, the job in {job.partitions}")
    net = job.link or m.shm
    S, R, P = job.shards, job.replicas, job.partitions
    shard_host, replica_host = _placement(job)
    machine_of = (lambda h: 0) if job.shared_cores else (lambda h: h)
    machines = sorted({machine_of(h) for h in range(job.hosts)})
    workers = {k: 0 for k in machines}
    ranks = {k: 0 for k in machines}
    for h in replica_host:
        workers[machine_of(h)] += P
        ranks[machine_of(h)] += P
    for h in [0, *shard_host]:  # the coordinator and the shards
        ranks[machine_of(h)] += 1
    # cores that ranks other than the workers keep busy however little they apply: the
    # coordinator (on host 0) and every shard's polling
    idle = {k: m.coordinator_cores * (k == 0) + job.background_cores for k in machines}
    for h in shard_host:
        idle[machine_of(h)] += m.shard_poll_cores
    cores_of = {k: m.cores if job.shared_cores else job.cores_per_host for k in machines}
    eff = {k: _co_run(m, workers[k]) for k in machines}

    fetch_bytes = FLOAT * rep.part_params / job.n_fetch  # per partition and step
    push_bytes = FLOAT * rep.part_params / job.n_push
    step_alone, breakdown, demand, per_link = 0.0, {}, {}, {}
    lockstep: dict[int, float] = {}  # machine -> seconds per round its cores idle at syncs

    def add(resource: str, seconds: float) -> None:
        demand[resource] = demand.get(resource, 0.0) + seconds

    remote_replicas = sum(1 for h in replica_host if any(sh != h for sh in shard_host))
    # CPU that ranks other than the workers spend per round (one step of every replica) on
    # each machine: the shards' apply and the TCP stack (half at each end of a transfer)
    others = {k: 0.0 for k in machines}
    for h in replica_host:
        for sh in shard_host:
            slice_push = P * push_bytes / S
            others[machine_of(sh)] += slice_push / m.apply_bw
            if sh != h:
                tcp = P * (fetch_bytes + push_bytes) / S * net.cpu_s_per_byte
                others[machine_of(sh)] += tcp / 2 + P * SHARD_HOT_S / job.n_push
                others[machine_of(h)] += tcp / 2
    speed = (1.0 - job.steal) * job.pace  # CPU work runs this much of its calibrated pace
    # a replica's partitions advance in lockstep (a synchronisation every layer, ~1 ms,
    # shorter than the hypervisor's slice): while it holds any of the g vCPUs a gang spans,
    # the others wait, so the gang runs while all g run: (1 - steal)^g of the time if the
    # vCPUs are taken independently. Its cores idle meanwhile: their capacity too
    gang_speed = {k: (1.0 - job.steal) ** (min(P, cores_of[k]) if P > 1 and workers[k] else 1)
                  * job.pace for k in machines}
    for r, h in enumerate(replica_host):
        k = machine_of(h)
        sp = gang_speed[k]  # this replica's CPU work runs at this much of its pace
        remote = [s for s in range(S) if shard_host[s] != h]
        local_share = (S - len(remote)) / S
        compute = rep.compute_s / eff[k] / sp
        exchange = 0.0
        crowded = ranks[k] + job.background_cores > cores_of[k]
        if P > 1:
            # the partitions' time-sharing of the cores, when they outnumber them, is the
            # cores' bound below; each synchronisation adds the measured gap while the
            # last partition to wake catches up (cores idle), on the step and on the bound
            gap = rep.syncs * m.sync_wait(workers[k] / cores_of[k], crowded)
            lockstep[k] = max(lockstep.get(k, 0.0), gap)
            exchange = (m.shm.time(rep.exchange_bytes, rep.exchange_msgs) + gap
                        + rep.exchange_msgs * m.exchange_msg_s / sp)
            if crowded:
                # no core to spare: whatever the shards, the coordinator and other tenants
                # run per round preempts one partition, and the others wait for it
                exchange += (idle[k] * rep.compute_s + others[k]) / sp
        elif crowded:
            # more ranks than cores: the scheduler spreads the other ranks' (and tenants')
            # work over every core, so it takes turns with the workers' compute even while
            # a core is idle between their wake-ups (measured: 4 shards beside one replica on
            # 2 cores cost it 5-9% against 1 shard, in runs of 3 and 2 repeats)
            compute += (others[k] + idle[k] * rep.compute_s) / cores_of[k] / sp
        # the protocol's control operations on each shard's counters: one atomic read per
        # fetch; a read of my slot's state and a Fetch_and_op on SEQ per push (posting only:
        # the shard pulls the push). A round trip of the link to a shard on another host; on
        # this one as measured beside polling ranks (0.1-0.3 ms on 2 busy cores, not the
        # link's microseconds)
        op = m.ctrl_op(workers[k] / cores_of[k], crowded)
        ops = sum(2 * net.latency_s if shard_host[s] != h else op for s in range(S))
        # fetch: Gets to every shard, then one flush; local slices are copies by this core
        fetch = fetch_bytes * local_share / m.copy_bw / sp + ops / job.n_fetch
        push = 2 * ops / job.n_push
        if remote:
            # Over TCP a shard's pull of a push progresses only while the worker calls MPI
            # (docs/multihost.md), so the transfer is not hidden behind compute. Fetches
            # leave the ps host and pushes enter it: on a full-duplex link a replica's fetch
            # meets only the others' fetches (its push their pushes), for the share of
            # their step they spend on them (a fixed point of those shares)
            wire_f = fetch_bytes * (1 - local_share) / net.bandwidth
            wire_p = push_bytes * (1 - local_share) / net.bandwidth
            rest = compute + fetch + push + (m.step_overhead_s + rep.overhead_s) / sp
            share_f = share_p = 1.0
            for _ in range(50):
                step = rest + wire_f * share_f + wire_p * share_p
                share_f = 1.0 + (remote_replicas - 1) * wire_f * share_f / step
                share_p = 1.0 + (remote_replicas - 1) * wire_p * share_p / step
            fetch += len(remote) * net.latency_s / job.n_fetch + wire_f * share_f
            push += wire_p * share_p
        parts = {"compute": compute, "exchange": exchange, "fetch": fetch, "push": push,
                 "overhead": (m.step_overhead_s + rep.overhead_s) / sp}
        t = sum(parts.values())
        if t >= step_alone:
            step_alone, breakdown = t, parts
        # cores of the replica's machine: every partition's layers, reads, copies and the
        # TCP stack's work on both ends of its remote traffic
        tcp = P * (fetch_bytes + push_bytes) * (1 - local_share) * net.cpu_s_per_byte
        add(f"cores of host {k}", rep.cpu_s / eff[k] + P * parts["overhead"] * sp
            + P * fetch_bytes * local_share / m.copy_bw + tcp
            + P * rep.exchange_msgs * m.exchange_msg_s)
        for s in range(S):
            sh = shard_host[s]
            pull = P * push_bytes / S
            remote_s = sh != h
            apply = pull / m.apply_bw + (pull / net.bandwidth if remote_s else 0.0)
            add(f"shard {s}", apply)
            add(f"cores of host {machine_of(sh)}",
                apply + (P * SHARD_HOT_S / job.n_push if remote_s else 0.0))
            if remote_s:
                fb = P * fetch_bytes / S
                # each direction of a NIC is its own resource (full duplex)
                add(f"NIC of host {sh} out", fb / net.bandwidth)
                add(f"NIC of host {h} in", fb / net.bandwidth)
                add(f"NIC of host {h} out", pull / net.bandwidth)
                add(f"NIC of host {sh} in", pull / net.bandwidth)
                key = f"host {h} <-> host {sh}"
                per_link[key] = per_link.get(key, 0.0) + fb + pull
            else:
                per_link["shared memory"] = per_link.get("shared memory", 0.0) + (
                    P * fetch_bytes / S + pull)
        if P > 1:
            per_link["partitions (shared memory)"] = (
                per_link.get("partitions (shared memory)", 0.0) + P * rep.exchange_bytes)

    # a shard is one rank and a host's cores run at the pace steal (and the pace) leave them
    # (a gang's host at its gang's)
    capacity = {res: 1.0 if res.startswith("NIC") else speed
                for res in demand if res.startswith(("shard", "NIC"))}
    for k in machines:  # the coordinator runs on the first ps host (host 0)
        capacity[f"cores of host {k}"] = max(0.05, cores_of[k] - idle[k]) * gang_speed[k]
    # each replica takes one step per round: rate per replica <= capacity / demand per round
    # (a gang's syncs leave its machine's cores idle: wall on top of their busy time)
    idle_wall = {f"cores of host {k}": gap for k, gap in lockstep.items()}
    bounds = {res: 1.0 / (d / capacity[res] + idle_wall.get(res, 0.0))
              for res, d in demand.items() if d > 0}
    rate = 1.0 / step_alone
    bottleneck = "replica step: " + max(breakdown, key=breakdown.get)
    for res, b in bounds.items():
        if b < rate:
            rate, bottleneck = b, res
    util = {res: rate * d / capacity[res] for res, d in demand.items()}
    pred = Prediction(job, 1.0 / rate, step_alone, breakdown, util,
                      {k: v / R for k, v in per_link.items()}, bottleneck)
    pred.samples_per_s_replica = rate * rep.batch
    pred.samples_per_s = pred.samples_per_s_replica * R
    pred.ps_utilisation = max((u for r_, u in util.items() if r_.startswith("shard")), default=0)
    if job.ranks > (m.cores if job.shared_cores else job.hosts * job.cores_per_host):
        pred.notes.append(f"{job.ranks} ranks on "
                          f"{m.cores if job.shared_cores else job.hosts * job.cores_per_host}"
                          " cores: ranks share cores")
    return pred


def sandblaster(rep: Replica, job: Job, m: Machine, examples: int, portions: int,
                history: int = 10) -> dict:
    """One Sandblaster L-BFGS iteration of ``examples`` (the coordinator hands ``portions``
    portions to ``job.replicas`` replicas; the shards run the L-BFGS vector operations).

    Modelled, not validated (docs/planner.md): the gradient pass is spread over the replicas
    at the pace of a replica computing alone, each portion costs a fetch and a push, and the
    shards' two-loop recursion streams 4 * history + 8 vectors of their slice from memory.
    """
    net = job.link or m.shm
    per_example = rep.compute_s / rep.batch
    replicas_busy = min(job.replicas, portions)
    cores = m.cores if job.shared_cores else job.hosts * job.cores_per_host
    share = min(1.0, (cores - m.coordinator_cores) / max(replicas_busy * rep.partitions, 1))
    share *= _co_run(m, min(replicas_busy * rep.partitions, cores))
    compute = examples * per_example / replicas_busy / share
    per_portion_bytes = FLOAT * rep.part_params
    rounds = math.ceil(portions / replicas_busy)
    transfer = rounds * 2 * net.time(per_portion_bytes, job.shards)
    lbfgs = (4 * history + 8) * FLOAT * rep.params / job.shards / m.copy_bw
    total = compute + transfer + lbfgs + rounds * m.step_overhead_s
    parts = {"compute": compute, "fetch+push": transfer, "shard L-BFGS": lbfgs}
    return {"iteration_s": total, "samples_per_s": examples / total, "breakdown": parts,
            "bottleneck": max(parts, key=parts.get)}
