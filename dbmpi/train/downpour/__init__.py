"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded parameters.

Each replica trains on its own shards of the data. Every ``n_fetch`` steps it fetches the
current parameters from the parameter-server shards, and every ``n_push`` steps it pushes the
gradients it accumulated since its last push; the shards apply them (Adagrad by default) as
they arrive. Replicas never wait for each other. Warm start: replica 0 trains alone for
``warm_start_steps`` steps, then releases the others, which start from its parameters.

The coordinator (rank 0) evaluates the current parameters on held-out data every
``eval_every_s`` seconds (or, with ``record_iterates``, only records them to be evaluated
after the run, so that evaluating takes no core from the replicas), logs progress, and raises
STOP when ``target_accuracy`` is reached or any rank received SIGTERM. A replica stops at its
step or epoch budget or at STOP; when every worker is finished (all its pushes acknowledged),
the coordinator has the shards write a last checkpoint, stops them, and everyone frees the
windows.

Checkpoints (:mod:`dbmpi.checkpoint`): every ``checkpoint.every_s`` seconds the coordinator
raises CKPT_REQ = k; each worker, at its next step boundary, waits until its pushes are
applied, publishes its step and data position, acknowledges k and pauses; when every worker
has acknowledged (or finished), each shard writes its block and optimizer state, the
coordinator commits the checkpoint directory and raises CKPT_DONE = k, and workers go on. The
pause makes the checkpoint consistent: no push is in flight while the shards write.

Control flags and reports go through :mod:`.control` (flags in the workers' memory,
reports on the coordinator's board), so that no per-step operation waits for the coordinator.
"""

from __future__ import annotations

import time
from pathlib import Path

from ... import checkpoint as ckpt_mod
from ... import order as order_mod
from ...config import Config
from ...data import open_dataset
from ...faults import Fault, checkpoint_delay
from ...liveness import TEARDOWN, Watchdog
from ...log import get_logger
from ...metrics import MetricsWriter
from ...model import Model
from ...optim import make_optimizer
from ...protocol import Board, Flag, Row
from ...ps import ParameterServer, ParamLayout, ShardService, sparse
from ...ps.server import Backoff
from ...topology import Role, Topology
from .. import partitioned
from .control import HEAD, ROW, Control
from .coordinator import Coordinator
from .sparse_worker import SparseWorker
from .worker import TermReporter, Worker

log = get_logger("downpour")


def build_model(cfg: Config, dataset) -> Model:
    return Model.from_config(cfg.model, dataset.feature_shape, dataset.num_classes)


def run(cfg: Config, topo: Topology, run_dir: Path, t0: float,
        resume: ckpt_mod.Checkpoint | None = None) -> dict | None:
    """Run Downpour on this rank; the coordinator returns the summary, others None.

    Collective over ``topo.comm``: every rank must call it. ``resume`` continues from a
    checkpoint (its parameters, optimizer state, step counts and data positions).
    """
    dataset = open_dataset(cfg.data.path)
    model = build_model(cfg, dataset)
    sparse = _sparse_parts(cfg, model)  # None: dense traffic (every model without a table)
    if sparse is None:
        layout = ParamLayout.even(model.num_params, cfg.topology.shards)
        ps = ParameterServer(topo, layout, partitioned.param_ranges(cfg, model, dataset))
    else:
        layout, ps = sparse["layout"], sparse["ps"](topo)
    coord = Control(topo)
    if resume is not None:  # every rank writes only its own memory here
        if coord.flags.local.size:
            coord.flags.local[Flag.RELEASED] = 1  # no second warm start
        if topo.role is Role.COORDINATOR:
            board = coord.board.local
            board[Board.STEPS] = int(resume.workers[:, 0].sum()) // cfg.topology.partitions
            rows = board[HEAD:coord.shard_beats].reshape(-1, ROW)
            rows[:, Row.STEP:Row.POSITION + 1] = resume.workers
        for win in (coord.flags, coord.board):
            win.sync()
    metrics = MetricsWriter(run_dir, topo.rank, t0)
    service = None
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        if resume is None:
            init = partitioned.initial_params(cfg, model, dataset)[lo:hi].copy()
            state, applied = None, 0
        else:
            (init, state), applied = resume.load_block(lo, hi), 0

        delay = checkpoint_delay()

        def write_checkpoint(sequence: int, svc: ShardService) -> None:
            ckpt_mod.write_shard(run_dir, sequence, topo.index, lo, hi, svc.params, svc.state,
                                 svc.applied, svc.optimizer.state_names)
            if delay:
                time.sleep(delay)

        service = (ShardService if sparse is None else sparse["service"])(
                               ps, make_optimizer(cfg.optimizer), init, state, applied,
                               on_checkpoint=write_checkpoint,
                               staleness_aware=cfg.downpour.staleness_aware,
                               record_order=cfg.run.record_order)
    topo.comm.Barrier()  # the shards hold the initial parameters before anyone fetches
    if topo.role is not Role.COORDINATOR and cfg.downpour.replica_loss == "continue":
        coord.watchdog = Watchdog(topo.label, lambda: coord.flags.local[Flag.CENSUS],
                                  cfg.downpour.lost_after_s,
                                  cfg.downpour.lost_after_s + cfg.checkpoint.deadline_s,
                                  leave_if_stuck=topo.role is Role.REPLICA)
        coord.watchdog.start()
    result = None
    try:
        if service is not None:
            fault = Fault(topo.rank)
            term = TermReporter(coord)

            def heartbeat():
                fault.check()
                term.check()
                coord.beat()

            applied = service.serve(heartbeat=heartbeat)
            if cfg.run.record_order:
                order_mod.write_shard(run_dir, topo.index, service.order)
            metrics.write("shard", shard=topo.index, pushes_applied=applied,
                          inbox_workers=sum(s == topo.index for s, _ in ps.inbox_at),
                          busy_s=round(service.busy_s, 3),
                          busy_cpu_s=round(service.busy_cpu_s, 3))
        elif topo.role is Role.REPLICA:
            worker = (Worker if sparse is None else sparse["worker"])(
                cfg, topo, partitioned.replica_model(cfg, topo, model, dataset), dataset, ps,
                coord, metrics, resume)
            worker.run()
            if cfg.run.record_order:
                order_mod.write_worker(run_dir, worker.worker, worker.client.fetch_log,
                                       cfg.topology.shards, worker.step, worker.client.pushes)
        else:
            result = Coordinator(cfg, topo, model, dataset, ps, coord, metrics, run_dir, t0,
                                 resume).run()
    finally:
        metrics.close()
    TEARDOWN.mode = _teardown(coord, topo, result)
    if not TEARDOWN.collective:
        return result  # the runner exits without a collective (dbmpi.liveness.Teardown)
    topo.comm.Barrier()  # nobody frees a window another rank still uses
    coord.free()
    ps.free()
    return result


def _teardown(coord: Control, topo: Topology, result: dict | None) -> int:
    """The coordinator, its outputs written, tells every live rank how to end (TEARDOWN);
    the others wait for it with heartbeats, so that a census still sees them."""
    if topo.role is Role.COORDINATOR:
        mode = TEARDOWN.LEAVE if result and result["replicas_lost"] else TEARDOWN.COLLECTIVE
        coord.raise_flag(Flag.TEARDOWN, mode, shards=True)
        return mode
    backoff = Backoff(cap=0.01)
    while not (mode := int(coord.read_flags()[Flag.TEARDOWN])):
        coord.beat()
        backoff.wait()
    if coord.watchdog is not None:
        coord.watchdog.stop()
    return mode


def _sparse_parts(cfg: Config, model) -> dict | None:
    """The sparse-embedding variants of the layout, PS, shard loop and worker (see
    :mod:`dbmpi.ps.sparse`), or None when the run moves whole vectors."""
    if not sparse.enabled(cfg, model):
        return None
    emb = sparse.embedding_of(model)
    layout = sparse.row_layout(model.num_params, cfg.topology.shards, emb.vocab, emb.dim)
    return {"layout": layout, "service": sparse.SparseShardService, "worker": SparseWorker,
            "ps": lambda topo: sparse.SparseParameterServer(
                topo, layout, [(0, model.num_params)], emb.vocab, emb.dim,
                sparse.max_rows(cfg, model))}
