"""Faults: SIGKILL of a random rank, a kill while a checkpoint is written, SIGTERM, NaN.

Each job runs under a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import JOB_ENV, MPIEXEC, ROOT, error_lines, make_synth_shards, run_job
from dbmpi import checkpoint as ckpt_mod
from test_jobs import _config

STEPS = 1000


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory) -> Path:
    """Synthetic data large enough (8000 train, 2000 test) that the final accuracy of the
    job below varies little between runs: 0.7085, 0.734, 0.7165, 0.7335 measured on a quiet
    machine; under heavy load (asynchronous replicas drift apart) 0.66-0.77 was seen."""
    return make_synth_shards(tmp_path_factory.mktemp("fault_data"), 8000, 2000, seed=2)


def _fault_config(tmp_path, data):
    """2 shards and 1 replica of a 784-64-10 MLP, 1000 steps, a checkpoint every 100.

    One replica with read_own_pushes is deterministic (it equals serial Adagrad whatever the
    timing), so a resumed run must end with exactly the accuracy of an uninterrupted one; with
    asynchronous replicas the final accuracy of this job spread over 0.64-0.80 between runs,
    too wide to tell a broken resume from noise."""
    cfg = _config(tmp_path, data, 2, 1, hidden=64, lr=0.02, steps=STEPS, read_own_pushes=True)
    cfg.write_text(cfg.read_text() + "\n[checkpoint]\nevery_steps = 100\n")
    return cfg


def _start(cfg: Path, env: dict | None = None, n: int = 5) -> subprocess.Popen:
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train", str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **JOB_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pids(cfg: Path) -> dict[int, int]:
    """World rank -> pid of the ranks running ``cfg`` (from /proc: PMI_RANK in the env)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            if str(cfg).encode() not in cmdline or b"dbmpi" not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0")
                       if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            out[int(env[b"PMI_RANK"])] = int(d.name)
    return out


def _wait_for(pred, timeout: float, what: str) -> None:
    t = time.time()
    while not pred():
        if time.time() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-????????"))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fault_data):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _fault_config(tmp, fault_data)
    proc = run_job(4, ["train", str(cfg)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _summary(tmp / "run")


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_random_rank_then_resume(tmp_path, fault_data, uninterrupted, trial):
    rng = random.Random(trial)
    cfg = _fault_config(tmp_path, fault_data)
    run = tmp_path / "run"
    proc = _start(cfg, n=4)
    try:
        _wait_for(lambda: _checkpoints(run) or proc.poll() is not None, 60, "a checkpoint")
        time.sleep(rng.uniform(0.0, 2.0))
        pids = _rank_pids(cfg)
        victim = rng.randrange(4)
        if proc.poll() is None and victim in pids:
            os.kill(pids[victim], signal.SIGKILL)
        proc.wait(timeout=60)  # the job must end, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = ckpt_mod.find_latest(run)
    # re-running the same command finishes the run
    again = run_job(4, ["train", str(cfg)], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _summary(run)
    assert summary["steps"] == STEPS
    assert summary["final_test_accuracy"] == pytest.approx(
        uninterrupted["final_test_accuracy"], abs=1e-9)
    assert summary["final_test_loss"] == pytest.approx(uninterrupted["final_test_loss"],
                                                       rel=1e-4)
    assert latest is not None  # the kill came after the first checkpoint
    if latest.final:  # killed after the work was done
        assert "finished run" in again.stderr
    else:  # killed mid-run: resumed from the newest checkpoint
        assert summary["resumed_from"] == {"sequence": latest.sequence, "steps": latest.steps}


def test_kill_while_writing_checkpoint_keeps_newest_readable(tmp_path, fault_data):
    cfg = _fault_config(tmp_path, fault_data)
    run = tmp_path / "run"
    # shards sleep 1 s inside every checkpoint write, after their file is on disk
    proc = _start(cfg, env={"DBMPI_CKPT_DELAY": "1.0"}, n=4)
    try:
        _wait_for(lambda: len(_checkpoints(run)) >= 1 and list(
            (run / "checkpoints").glob("*.tmp/shard-*.h5")) or proc.poll() is not None,
                  90, "a checkpoint being written after a committed one")
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        pids = _rank_pids(cfg)
        os.kill(pids[1], signal.SIGKILL)  # shard 0, in the middle of writing
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    pending = list((run / "checkpoints").glob("*.tmp"))
    assert pending  # the interrupted one was never committed ...
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and latest.path == _checkpoints(run)[-1]  # ... the newest is fine
    params, state = latest.load_block(0, latest.num_params)
    assert params.shape == (latest.num_params,) and state.shape == (1, latest.num_params)
    again = run_job(4, ["train", str(cfg)], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(run)["steps"] == STEPS


def test_sigterm_writes_checkpoint_and_resume_finishes(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, 2, 2, steps=100000, read_own_pushes=False)
    run = tmp_path / "run"
    proc = _start(cfg)
    try:
        _wait_for(lambda: (run / "metrics").is_dir() and len(_rank_pids(cfg)) == 5, 60,
                  "the job to start")
        time.sleep(2.0)
        t = time.time()
        for pid in _rank_pids(cfg).values():  # what SLURM does: SIGTERM to every task
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        stop_s = time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert stop_s < 15
    assert "interrupted" in out
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and not latest.final and latest.steps > 0
    summary = _summary(run)
    assert summary["interrupted"] is True
    # resume with a finite budget: it continues from the checkpoint's step counts
    done = max(int(s) for s in latest.workers[:, 0]) + 20
    again = run_job(5, ["train", str(cfg), "--set", f"downpour.steps={done}"], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = _summary(run)
    assert s2["resumed_from"]["steps"] == latest.steps
    assert s2["steps"] == 2 * done
    # and a finished run is not trained again
    third = run_job(5, ["train", str(cfg), "--set", f"downpour.steps={done}"], timeout=60)
    assert third.returncode == 0 and "finished run" in third.stderr


def test_diverging_training_stops_with_one_line(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, 2, 2, steps=2000, read_own_pushes=False)
    proc = run_job(5, ["train", str(cfg), "--set", "optimizer.name='sgd'",
                       "--set", "optimizer.learning_rate=1e30"], timeout=60)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert lines and ("NaN" in lines[0] or "nan" in lines[0] or "inf" in lines[0])
    assert "learning_rate" in lines[0]


def test_resume_is_exact_for_one_replica(tmp_path, small_data):
    """SIGTERM mid-run, then resume: one replica with read_own_pushes still ends with exactly
    the parameters of serial numpy Adagrad, so parameters, Adagrad state and the data position
    all came back from the checkpoint."""
    import numpy as np

    from dbmpi.checkpoint import load_params
    from dbmpi.model import Model
    from test_jobs import HIDDEN, SEED, _numpy_adagrad_reference

    # the replica sleeps to make each step 10x longer (numerically irrelevant), so that
    # SIGTERM lands mid-run
    cfg = _config(tmp_path, small_data, 2, 1, steps=200, straggler_replica=0,
                  straggler_factor=10.0)
    run = tmp_path / "run"
    proc = _start(cfg, n=4)
    cmd_cfg = cfg
    try:
        _wait_for(lambda: len(_rank_pids(cmd_cfg)) == 4 and (run / "metrics").is_dir(), 60,
                  "the job to start")
        _wait_for(lambda: any(ln.strip() for ln in open(run / "metrics" / "rank-00003.jsonl"))
                  if (run / "metrics" / "rank-00003.jsonl").exists() else False, 60,
                  "the first training record")
        for pid in _rank_pids(cfg).values():
            os.kill(pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    latest = ckpt_mod.find_latest(run)
    assert latest is not None and 0 < latest.steps < 200
    again = run_job(4, ["train", str(cfg)], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    params, _ = load_params(run / "params.h5")
    model = Model.from_spec((28, 28), [{"type": "dense", "units": HIDDEN}], 10)
    expected = _numpy_adagrad_reference(small_data, model.init_params(SEED))
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)
