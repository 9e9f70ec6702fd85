"""One job per run directory (issue 19, item 4): RUN_DIR/dbmpi.lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import error_lines, run_job
from test_jobs import job_config

from dbmpi import runlock
from dbmpi.runlock import EXIT_LOCKED, LOCK_NAME, RunLock, RunLocked


def _dead_pid() -> int:
    """The pid of a process that has ended (reaped: no process has it now)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(run, host, pid, job=None, age_s=0.0):
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "slurm_job_id": job,
                                "started": "2026-01-01T00:00:00"}))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_lock_refuses_a_live_holder_and_names_it(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), os.getppid(), job="4242")
    with pytest.raises(RunLocked) as exc:
        RunLock(tmp_path).acquire()
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == EXIT_LOCKED
    assert f"host {socket.gethostname()}, pid {os.getppid()}, SLURM job 4242" in msg
    assert "--set run.dir=PATH" in msg and str(tmp_path / LOCK_NAME) in msg


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, socket.gethostname(), dead)
    warned = []
    lock = RunLock(tmp_path).acquire(warn=warned.append)
    assert len(warned) == 1 and f"pid {dead} is gone" in warned[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert list(tmp_path.iterdir()) == []  # the stale file is not left aside either


def test_lock_of_a_zombie_holder_is_taken_over(tmp_path):
    """A rank that died but whose parent has not reaped it (seen: orphaned ranks under a
    VM's init) still answers kill(0); its lock is stale all the same."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # ended, not yet reaped: a zombie
        os.kill(child.pid, 0)  # which kill(0) takes for alive
        assert runlock.stale_reason({"host": socket.gethostname(), "pid": child.pid}, 0.0) \
            == f"its pid {child.pid} is gone"
        assert runlock.stale_reason({"host": socket.gethostname(), "pid": os.getpid()},
                                    0.0) is None
    finally:
        child.wait()


def test_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    _write_lock(tmp_path, "elsewhere-node", 1, age_s=runlock.STALE_S / 2)
    with pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()
    _write_lock(tmp_path, "elsewhere-node", 1, age_s=runlock.STALE_S * 2)
    warned = []
    RunLock(tmp_path).acquire(warn=warned.append).release()
    assert len(warned) == 1 and "heartbeat stopped" in warned[0]


def test_holder_heartbeat_and_release_keeps_a_taken_over_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > old + 500  # the holder touched it
    _write_lock(tmp_path, "elsewhere-node", 7)  # another job took it over meanwhile
    lock.release()
    assert json.loads(path.read_text())["host"] == "elsewhere-node"  # not removed


@pytest.mark.job
def test_second_job_in_a_held_run_dir_refuses_and_writes_nothing(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 1, 1, steps=50)
    run = tmp_path / "run"
    _write_lock(run, socket.gethostname(), os.getpid(), job="777")  # this test: a live pid
    before = sorted(p.name for p in run.iterdir())
    proc = run_job(3, ["train", str(cfg)])
    assert proc.returncode == EXIT_LOCKED, proc.stderr[-3000:]
    errs = error_lines(proc)
    assert len(errs) == 1 and f"pid {os.getpid()}, SLURM job 777" in errs[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


@pytest.mark.job
def test_stale_lock_of_a_dead_job_does_not_block_the_run(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 1, 1, steps=50)
    run = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run, socket.gethostname(), dead)
    proc = run_job(3, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    warn = [ln for ln in proc.stderr.splitlines() if "taking over the lock" in ln]
    assert len(warn) == 1 and f"pid {dead} is gone" in warn[0]
    assert (run / "summary.json").exists()
    assert not (run / LOCK_NAME).exists()  # released at the end
