"""``python -m dbmpi train``: set up the job collectively, run the algorithm, write results.

Set-up errors (config, rank count, data, run directory) are agreed on by every rank with one
``allgather``, so a mistake made on any rank ends all of them with the same one-line message.
After set-up, an exception on one rank aborts the whole job (``MPI_Abort``), naming the rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import checkpoint as ckpt_mod
from . import config as config_mod
from . import metrics as metrics_mod
from .errors import DbmpiError
from .faults import TERMINATION
from .liveness import NOTICE, TEARDOWN
from .log import get_logger, setup_logging
from .progress import steps_phrase
from .report import plot_learning_curve, write_json
from .runlock import RunLock
from .topology import Role, Topology, check_world_size

log = get_logger()


class AgreedError(DbmpiError):
    """A set-up error every rank knows about (so all can exit without MPI_Abort)."""


def agree(comm: MPI.Comm, fn, *args):
    """Run ``fn`` on every rank; if it raised a DbmpiError anywhere, raise it everywhere."""
    result, message = None, None
    try:
        result = fn(*args)
    except DbmpiError as exc:
        message = (str(exc), exc.exit_code)
    messages = comm.allgather(message)
    for rank, msg in enumerate(messages):
        if msg is not None:
            err = AgreedError(msg[0] if rank == 0 else f"(rank {rank}) {msg[0]}")
            err.exit_code = msg[1]  # e.g. a busy run directory keeps its own status
            raise err
    return result


def _latest_run(name: str) -> Path | None:
    runs = sorted(p for p in Path("runs").glob(f"{name}-*") if (p / "checkpoints").is_dir())
    return runs[-1] if runs else None


def _make_run_dir(cfg: config_mod.Config, comm: MPI.Comm, resume: bool) -> Path:
    """Rank 0 creates the run directory and saves the config; every rank gets its path.

    With ``resume`` and no ``run.dir``, the newest ``runs/NAME-*`` that holds checkpoints.
    """
    path, error, code = None, None, 2
    if comm.Get_rank() == 0:
        name = cfg.run.dir or f"runs/{cfg.run.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if resume and not cfg.run.dir:
            latest = _latest_run(cfg.run.name)
            if latest is None:
                error = (f"--resume: no run directory runs/{cfg.run.name}-* holds a checkpoint; "
                         f"start without --resume, or name the run with --set run.dir=PATH")
            name = str(latest)
        path = Path(name)
        try:
            path.mkdir(parents=True, exist_ok=True)
            _lock_run_dir(path)  # before anything is written: another job may own it
            (path / "metrics").mkdir(parents=True, exist_ok=True)
            (path / "config.toml").write_text(config_mod.to_toml(cfg))
        except OSError as exc:
            error = (f"run.dir: cannot write the run directory {path} ({exc.strerror}): choose "
                     f"a writable place with --set run.dir=PATH")
        except DbmpiError as exc:
            error, code = str(exc), exc.exit_code
    path, error, code = comm.bcast((str(path) if path else None, error, code), root=0)
    if error:
        err = DbmpiError(error)
        err.exit_code = code
        raise err
    return Path(path)


_RUN_LOCK: RunLock | None = None  # rank 0's lock on the run directory, while it runs


def _lock_run_dir(path: Path) -> None:
    """Rank 0: take RUN_DIR's lock (RunLocked names the job that holds it)."""
    global _RUN_LOCK
    _RUN_LOCK = RunLock(path).acquire(
        warn=lambda line: print(line, file=sys.stderr, flush=True))


def _release_run_dir() -> None:
    """Give the run directory back: at the end, on errors, before MPI_Abort."""
    global _RUN_LOCK
    if _RUN_LOCK is not None:
        _RUN_LOCK.release()
        _RUN_LOCK = None


def resume_mismatch(ck: ckpt_mod.Checkpoint, cfg: config_mod.Config,
                    num_params: int) -> str | None:
    """Why checkpoint ``ck`` cannot continue under ``cfg`` (one line), or None."""
    parts = (ck.config or {}).get("topology", {}).get("partitions", 1)
    opt = (ck.config or {}).get("optimizer", {}).get("name", "adagrad")
    if ck.num_params != num_params:
        return (f"{ck.path}: checkpoint of a model with {ck.num_params} parameters, "
                f"but this config makes {num_params}: use another run.dir")
    if parts != cfg.topology.partitions:
        # the shards hold the partition-major layout of that many partitions
        return (f"{ck.path}: checkpoint written with topology.partitions = {parts}, "
                f"this config has {cfg.topology.partitions}: resume with {parts} or "
                f"use another run.dir")
    if opt != cfg.optimizer.name and cfg.algorithm == "downpour":
        # the shards' state is that optimizer's (an accumulator is not Adam's moments)
        return (f"{ck.path}: checkpoint written with optimizer.name = {opt!r}, this "
                f"config has {cfg.optimizer.name!r}: its state does not carry over; "
                f"resume with {opt!r} or use another run.dir")
    return None


def _find_checkpoint(run_dir: Path, comm: MPI.Comm, num_params_fn, cfg):
    """Rank 0 looks for the newest valid checkpoint in ``run_dir``; all ranks open it."""
    found, error = None, None
    if comm.Get_rank() == 0:
        try:
            ck = ckpt_mod.resume_point(run_dir)
        except ckpt_mod.NoValidCheckpoint as exc:
            ck, error = None, str(exc)
        if ck is not None:
            error = resume_mismatch(ck, cfg, num_params_fn())
            found = str(ck.path)
    found, error = comm.bcast((found, error), root=0)
    if error:
        raise DbmpiError(error)
    return ckpt_mod.open_checkpoint(found, verify=False) if found else None


def _num_params(cfg: config_mod.Config) -> int:
    from .data import open_dataset
    from .train.downpour import build_model

    return build_model(cfg, open_dataset(cfg.data.path)).num_params


def _check_data(cfg: config_mod.Config) -> None:
    from .data import open_dataset

    if not cfg.data.path:  # the default used to be a demo set, trained silently
        raise DbmpiError("data.path: not given (the config file has no [data] path, or an "
                         "empty one): add [data] with path = \"DIR\" (the directory holding "
                         "manifest.json), or pass --set data.path='DIR'")
    ds = open_dataset(cfg.data.path)
    if len(ds.splits.get("train", [])) < cfg.topology.replicas:
        raise DbmpiError(
            f"{cfg.data.path}: {len(ds.splits.get('train', []))} train shards for "
            f"{cfg.topology.replicas} replicas: each replica needs its own shard; re-shard with "
            f"`python -m data_tools shard ... --shards {cfg.topology.replicas}` or more")
    if cfg.algorithm == "downpour":  # sandblaster reads sandblaster.batch_size
        # replica r reads train shards r, r+R, ...: a batch larger than that would cycle its
        # data several times per step (a job crawled at 4 steps in 2 minutes)
        counts = [e["num_examples"] for e in ds.manifest["splits"]["train"]]
        R = cfg.topology.replicas
        r = min(range(R), key=lambda i: sum(counts[i::R]))
        have = sum(counts[r::R])
        if cfg.data.batch_size > have:
            raise DbmpiError(
                f"data.batch_size = {cfg.data.batch_size} is larger than replica {r}'s train "
                f"data ({have} examples in {len(counts[r::R])} shards of {cfg.data.path}); "
                f"set data.batch_size <= {have}, or use fewer replicas")
    if cfg.data.eval_split not in ds.splits:
        raise DbmpiError(f"data.eval_split: {cfg.data.path} has no split "
                         f"'{cfg.data.eval_split}' (it has {sorted(ds.splits)})")


def train(config_path: str, overrides: list[str], comm: MPI.Comm = MPI.COMM_WORLD,
          resume: bool = False) -> int:
    """Train (see :func:`_train`), the run directory's lock released however it ends."""
    try:
        return _train(config_path, overrides, comm, resume)
    finally:
        _release_run_dir()
        NOTICE.ignore()


def _train(config_path: str, overrides: list[str], comm: MPI.Comm, resume: bool) -> int:
    t0, cpu0 = time.time(), time.process_time()
    rank = comm.Get_rank()
    t0 = comm.bcast(t0, root=0)  # one time origin, so metrics of different ranks line up
    setup_logging(rank)
    TERMINATION.install()  # from the start: a Ctrl-C during set-up is no traceback per rank
    NOTICE.install()  # hydra's death notice (SIGUSR1) must not kill a survivor
    try:
        cfg = agree(comm, config_mod.load, config_path, overrides)
        TERMINATION.graceful = cfg.algorithm == "downpour"  # the one that stops on the flag
        agree(comm, check_world_size, cfg.topology, comm.Get_size())
        agree(comm, _check_data, cfg)
        run_dir = agree(comm, _make_run_dir, cfg, comm, resume)
        checkpoint = agree(comm, _find_checkpoint, run_dir, comm, lambda: _num_params(cfg), cfg)
    except AgreedError as exc:
        if rank == 0:
            print(f"dbmpi: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if checkpoint is not None and checkpoint.final:
        return comm.bcast(_finished_run(cfg, run_dir, checkpoint) if rank == 0 else None,
                          root=0)
    topo = Topology.create(cfg.topology, comm)
    setup_logging(rank, topo.label)
    if rank == 0:
        log.info("%s: %d ranks = coordinator + %d shards + %d replicas x %d partitions; run "
                 "directory %s", cfg.algorithm, comm.Get_size(), cfg.topology.shards,
                 cfg.topology.replicas, cfg.topology.partitions, run_dir)
        if checkpoint is not None:
            log.info("resuming from %s (%s)", checkpoint.path, _checkpoint_steps(checkpoint, cfg))
    _log_placement(topo, run_dir)
    try:
        if cfg.algorithm == "sandblaster":
            from .train import sandblaster

            result = sandblaster.run(cfg, topo, run_dir, t0, checkpoint)
        else:
            from .train import downpour

            result = downpour.run(cfg, topo, run_dir, t0, checkpoint)
    except BaseException as exc:  # one rank failing must end the whole job, never hang it
        label = topo.label
        msg = str(exc) if isinstance(exc, DbmpiError) else f"{type(exc).__name__}: {exc}"
        print(f"dbmpi: error on rank {rank} ({label}): {msg}; aborting the job",
              file=sys.stderr, flush=True)
        if not isinstance(exc, DbmpiError):
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
        time.sleep(0.5)  # let mpiexec forward the message before MPI_Abort kills the job
        _release_run_dir()  # MPI_Abort skips every finally
        comm.Abort(exc.exit_code if isinstance(exc, DbmpiError) else 1)
        return 1  # not reached
    # CPU accounting: how much of its wall time each rank spent on a core.
    stats = np.array([float(topo.role), float(topo.index), time.process_time() - cpu0,
                      time.time() - t0], dtype=np.float64)
    if not TEARDOWN.collective:  # a replica was lost: no collective may include the dead
        _leave(cfg, run_dir, result, stats)
    table = np.zeros((comm.Get_size(), 4)) if rank == 0 else None
    comm.Gather(stats, table, root=0)
    code = 0
    if rank == 0:
        try:
            _finish(cfg, run_dir, result, table)
        except ckpt_mod.DiskWriteError as exc:  # the final checkpoint stands: a re-run rebuilds
            print(f"dbmpi: error: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
    topo.free()
    TERMINATION.uninstall()
    code = comm.bcast(code, root=0)
    return code or _interrupted_status(comm, result)


def _leave(cfg, run_dir: Path, result: dict | None, stats: np.ndarray) -> None:
    """End this rank without MPI_Finalize (which would wait for the dead ranks): rank 0
    writes the summary (its own CPU row only), everyone flushes and exits 0 (74 if the
    summary could not be written), so the job's status is 0 once every survivor is out."""
    import logging

    code = 0
    if result is not None:
        try:
            _finish(cfg, run_dir, result, stats[None, :])
        except ckpt_mod.DiskWriteError as exc:
            print(f"dbmpi: error: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
    _release_run_dir()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _finished_run(cfg, run_dir: Path, ck) -> int:
    """Rank 0, a run directory whose final checkpoint is committed: nothing to train, but the
    outputs a failed final write lost are rebuilt (a full disk used to lose the summary for
    good). Returns the exit status."""
    from .rebuild import missing_outputs, rebuild_missing

    head = f"{run_dir} holds a finished run (checkpoint {ck.sequence}, " \
           f"{_checkpoint_steps(ck, cfg)})"
    if not missing_outputs(run_dir, cfg):
        print(f"dbmpi: {head}: nothing to do; use another run.dir for a new run",
              file=sys.stderr, flush=True)
        return 0
    try:
        done = rebuild_missing(run_dir, ck, cfg)
    except ckpt_mod.DiskWriteError as exc:
        print(f"dbmpi: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(f"dbmpi: {head}: rebuilt the missing {', '.join(done) or 'nothing'} from checkpoint "
          f"{ck.sequence} and metrics/rank-*.jsonl", file=sys.stderr, flush=True)
    return 0


def _interrupted_status(comm: MPI.Comm, result: dict | None) -> int:
    """0, or 128 + the signal that stopped the run (143 SIGTERM, 130 SIGINT) on every rank;
    SIGTERM wins when both came (the scheduler's stop, not the terminal's)."""
    interrupted = comm.bcast(bool(result and result.get("interrupted")), root=0)
    signum = comm.allreduce(TERMINATION.signum, op=MPI.MAX)
    return 128 + (signum or 15) if interrupted else 0


def _log_placement(topo: Topology, run_dir: Path) -> None:
    """Collective: where every rank runs (host, pid), logged and kept in placement.json.

    Placement decides speed (a replica's partitions on one host, shards where asked), so
    the log says where ranks actually landed, whatever launched them.
    """
    from .placement import host_lines

    row = {"rank": topo.rank, "role": topo.role.name.lower(), "index": topo.index,
           "partition": topo.partition, "host": MPI.Get_processor_name(), "pid": os.getpid()}
    log.debug("on host %s, pid %d", row["host"], row["pid"])
    rows = topo.comm.gather(row, root=0)
    if topo.rank == 0:
        for line in host_lines(rows, topo.cfg.partitions):
            log.info("%s", line)
        write_json(run_dir / "placement.json", {"ranks": rows})


def _steps_done(result: dict, replicas: int) -> str:
    """Downpour: ``5000 steps per replica (10000 in all)`` (``downpour.steps`` counts per
    replica, ``steps`` in summary.json sums them); Sandblaster: ``N iterations`` (each one
    is the whole batch, over all replicas)."""
    if "replica_steps" in result:
        return steps_phrase(result["steps"], replicas, result["replica_steps"])
    return f"{result['steps']} iterations"


def _checkpoint_steps(ck, cfg) -> str:
    """A checkpoint's steps as its run counted them (its workers' rows: replica-major)."""
    if cfg.algorithm != "downpour":
        return f"{ck.steps} steps"
    P = cfg.topology.partitions
    each = [int(s) for s in ck.workers[::P, 0]]  # column 0: STEP
    return steps_phrase(ck.steps, len(each), each)


def _finish(cfg, run_dir: Path, result: dict, table: np.ndarray) -> None:
    ranks = []
    for r, (role, index, cpu, wall) in enumerate(table):
        ranks.append({"rank": r, "role": Role(int(role)).name.lower(), "index": int(index),
                      "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                      "cpu_fraction": round(cpu / wall, 4) if wall else 0.0})
    idle = [x["cpu_fraction"] for x in ranks if x["role"] != "replica"]
    summary = {
        **result,
        "algorithm": cfg.algorithm,
        "topology": {"shards": cfg.topology.shards, "replicas": cfg.topology.replicas,
                     "partitions": cfg.topology.partitions},
        "cores": os.cpu_count(),
        "max_non_replica_cpu_fraction": max(idle) if idle else 0.0,
        "ranks": ranks,
    }
    metrics_mod.merge(run_dir)
    with ckpt_mod.writing(run_dir / "summary.json", run_dir / "summary.json.tmp"):
        write_json(run_dir / "summary.json", summary)
    try:
        if cfg.run.learning_curve:
            with ckpt_mod.writing(run_dir / "learning_curve.png"):
                plot_learning_curve(run_dir)
    except ckpt_mod.DiskWriteError:
        raise
    except Exception as exc:  # a missing plot must not lose a finished run
        log.warning("could not draw the learning curve: %s", exc)
    done = _steps_done(result, cfg.topology.replicas)
    if result.get("interrupted"):
        print(f"interrupted after {done}: a checkpoint was written; run the "
              f"same command with --set run.dir={run_dir} (or --resume) to continue", flush=True)
    print(f"final test accuracy {result['final_test_accuracy']:.4f} after {done} "
          f"in {result['wall_s']:.1f} s", flush=True)
    for loss in result.get("replicas_lost", []):
        print(f"replica {loss['replica']} was lost at step {loss['step']} ({loss['who']}); "
              f"the others went on (summary.json: replicas_lost)", flush=True)
    print(f"run directory: {run_dir}", flush=True)
    log.debug("summary: %s", json.dumps(summary))
