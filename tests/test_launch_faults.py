"""Ctrl-C, a killed rank, and what `dbmpi launch` shows of a failing job (issue 19, items 6,
7 and 9): one line and the job's exit status; MPICH's own lines go to RUN_DIR/launch.log."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from conftest import JOB_ENV, ROOT, Job, error_lines, rank_pids, run_job, start_job
from test_jobs import job_config

from dbmpi import checkpoint as ckpt_mod

pytestmark = pytest.mark.job  # every test here starts MPI jobs

MPICH_NOISE = ("Abort(", "=   BAD TERMINATION", "YOUR APPLICATION TERMINATED", "=====")


def _long_config(tmp_path, data):
    cfg = job_config(tmp_path, data, 2, 2, steps=100000, read_own_pushes=False)
    cfg.write_text(cfg.read_text() + "\n[checkpoint]\nevery_steps = 50\n")
    return cfg


def _committed(run) -> int:
    return len(list(ckpt_mod.checkpoint_root(run).glob("ckpt-????????")))


def _launch_job(cfg, *args) -> Job:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return Job([sys.executable, "-m", "dbmpi", "launch", str(cfg), *args],
               {**env, **JOB_ENV}, ROOT, run_dir=cfg.parent / "run")


def _resumes(cfg, run, latest):
    done = max(int(s) for s in latest.workers[:, 0]) + 20
    again = run_job(5, ["train", str(cfg), "--set", f"downpour.steps={done}"])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"]["steps"] == latest.steps


def test_sigint_to_every_rank_checkpoints_and_exits_130(tmp_path, small_data):
    """A terminal's Ctrl-C reaches every rank (mpiexec passes it on): like SIGTERM, a last
    checkpoint and exit 130, no traceback; the same command resumes."""
    cfg = _long_config(tmp_path, small_data)
    run = tmp_path / "run"
    with start_job(5, ["train", str(cfg)]) as job:
        job.wait_for(lambda: _committed(run) >= 1 and len(rank_pids(cfg)) == 5,
                     "a first checkpoint")
        for pid in rank_pids(cfg).values():
            os.kill(pid, signal.SIGINT)
        proc = job.wait()
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert "SIGINT received" in proc.stderr and "interrupted after" in proc.stdout
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and not latest.final and latest.steps > 0
    _resumes(cfg, run, latest)


def test_launch_forwards_sigint_once_and_keeps_130(tmp_path, small_data):
    """Ctrl-C on `dbmpi launch` (mpiexec runs in its own session, so it gets it once, from
    launch: a second one would make hydra abort at once)."""
    cfg = _long_config(tmp_path, small_data)
    run = tmp_path / "run"
    with _launch_job(cfg) as job:
        job.wait_for(lambda: _committed(run) >= 1, "a first checkpoint")
        os.kill(job.proc.pid, signal.SIGINT)
        proc = job.wait()
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert not any(s in proc.stderr + proc.stdout for s in MPICH_NOISE), proc.stderr[-3000:]
    assert "[mpiexec@" not in proc.stderr
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and not latest.final and latest.steps > 0
    assert not (run / "dbmpi.lock").exists()


def test_launch_names_a_killed_shard_and_ends_the_job_with_75(tmp_path, small_data):
    """A shard's death ends the job (a replica's does not: tests/test_replica_loss.py): the
    coordinator's census finds the silent shard, names it and aborts with 75, so that the
    same command resumes from the last checkpoint."""
    cfg = _long_config(tmp_path, small_data)
    run = tmp_path / "run"
    with _launch_job(cfg, "--set", "downpour.lost_after_s=2") as job:
        job.wait_for(lambda: _committed(run) >= 1 and (run / "placement.json").exists()
                     and len(rank_pids(cfg)) == 5, "a first checkpoint")
        pid = rank_pids(cfg)[2]
        os.kill(pid, signal.SIGKILL)
        proc = job.wait()
    assert proc.returncode == 75, proc.stderr[-3000:]
    rows = {r["rank"]: r for r in json.loads((run / "placement.json").read_text())["ranks"]}
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"dbmpi: error on rank 0 (coordinator): rank 2 (shard 1 on "
                    f"{rows[2]['host']}, pid {pid}) died (no heartbeat for "
                    f"downpour.lost_after_s = 2 s after a process of the job ended): a "
                    f"parameter-server shard is lost, so the job ends; re-run the same command "
                    f"to resume from the last checkpoint; aborting the job"), proc.stderr[-3000:]
    assert not any(s in proc.stderr + proc.stdout for s in MPICH_NOISE), proc.stderr[-3000:]
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and not latest.final


def test_launch_shows_one_line_for_a_failing_rank_and_keeps_its_status(tmp_path, small_data):
    """A rank's error (diverging training: MPI_Abort with status 2): its one line and status
    2, without MPICH's `Abort(2) on node ...` lines (when hydra prints them: a race), which
    RUN_DIR/launch.log keeps and --verbose shows."""
    cfg = job_config(tmp_path, small_data, 2, 2, steps=2000, read_own_pushes=False)
    bad = ["--set", "optimizer.name='sgd'", "--set", "optimizer.learning_rate=1e30"]
    log = tmp_path / "run" / "launch.log"
    for verbose in (False, True):
        before = log.read_text() if log.exists() else ""
        with _launch_job(cfg, *bad, *(["--verbose"] if verbose else [])) as job:
            proc = job.wait()
        assert proc.returncode == 2, proc.stderr[-3000:]
        errs = error_lines(proc)
        # (both replicas may see the NaN at once: each says so, in its one line)
        assert errs and all("lower optimizer.learning_rate" in e for e in errs), proc.stderr
        assert "Traceback" not in proc.stderr
        kept = (log.read_text() if log.exists() else "")[len(before):].splitlines()
        assert all(ln.startswith(MPICH_NOISE) for ln in kept), kept
        shown = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.startswith(MPICH_NOISE)]
        assert shown == (kept if verbose else []), (shown, kept)


def test_hydra_lines_are_held_back_and_a_killed_rank_is_named(tmp_path):
    """The filter and the last line on hydra's own words (as MPICH 4 prints them)."""
    import io
    import threading

    from dbmpi import supervise

    hydra = ("final test accuracy 0.5\n\n"
             + "=" * 83 + "\n=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n"
             "=   PID 4321 RUNNING AT nodeA\n=   EXIT CODE: 9\n"
             "=   CLEANING UP REMAINING PROCESSES\n=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES\n"
             + "=" * 83 + "\nYOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)"
             "\nThis typically refers to a problem with your application.\n"
             "Please see the FAQ page for debugging suggestions\nstep 5\rstep 6\r\n")
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, hydra.encode()), os.close(w)))
    writer.start()
    out = io.StringIO()
    state = supervise._State(None)
    supervise._Stream(r, out, False, state).run()
    writer.join()
    assert out.getvalue() == "final test accuracy 0.5\nstep 5\rstep 6\r\n"
    assert len(state.mpich) == 10
    assert supervise.death(state.mpich) == (4321, "nodeA", 9)
    (tmp_path / "placement.json").write_text(json.dumps({"ranks": [
        {"rank": 0, "role": "coordinator", "index": 0, "partition": 0, "host": "nodeA",
         "pid": 1},
        {"rank": 5, "role": "replica", "index": 1, "partition": 1, "host": "nodeA",
         "pid": 4321}]}))
    assert supervise.death_line(4321, "nodeA", 9, str(tmp_path)) == (
        "dbmpi: error: rank 5 (replica 1.1, host nodeA, pid 4321) died (SIGKILL): the job was "
        "ended; re-run the same command to resume from the last checkpoint")


# A stand-in for hydra's mpiexec at the end of a multi-host job (seen with strace on hydra
# 5.0.2): the job's lines, then killed by SIGPIPE writing a death notice to a gone proxy.
_SIGPIPED_MPIEXEC = """
import json, os, signal, sys
run, summary = sys.argv[1], sys.argv[2]
if summary != "none":
    with open(os.path.join(run, "summary.json"), "w") as fh:
        json.dump({"interrupted": summary == "interrupted", "steps": 60}, fh)
print("run directory:", run, flush=True)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
os.kill(os.getpid(), signal.SIGPIPE)
"""


@pytest.mark.parametrize("summary, stale, status", [
    ("finished", False, 0),        # every rank reached the end: the job's own status
    ("interrupted", False, 143),   # stopped by a signal after its checkpoint
    ("none", False, 141),          # ended before the coordinator's summary
    ("finished", True, 141),       # a summary left by an earlier launch says nothing of this one
])
def test_mpiexec_killed_by_sigpipe_is_judged_by_the_runs_summary(tmp_path, capfd, summary,
                                                                 stale, status):
    from dbmpi import supervise

    run = tmp_path / "run"
    run.mkdir()
    if stale:
        (run / "summary.json").write_text(json.dumps({"interrupted": False}))
        os.utime(run / "summary.json", (0, 0))
    cmd = [sys.executable, "-c", _SIGPIPED_MPIEXEC, str(run), "none" if stale else summary]
    assert supervise.supervise(cmd, dict(os.environ), None) == status
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("dbmpi")]
    if status == 141:
        assert err == ["dbmpi: error: mpiexec was killed by SIGPIPE (hydra signalling a host "
                       "whose ranks had left) before the job recorded its end; re-run the same "
                       "command to resume from the last checkpoint"]
    else:
        assert err == []
