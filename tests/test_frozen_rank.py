"""A frozen rank (SIGSTOP; on a cluster a hung node) must not hold SIGTERM until the
scheduler's KillWait SIGKILLs the job: the coordinator waits at most checkpoint.deadline_s,
names the rank it could not reach, ends the job with status 75 and commits nothing."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import error_lines, rank_pids, run_job, start_job
from test_jobs import job_config

from dbmpi import checkpoint as ckpt_mod
from dbmpi.config import load
from dbmpi.errors import ConfigError

DEADLINE_S = 3.0
# what the machine may add to the deadline: the stuck-shard probe, the abort, MPICH's teardown
MARGIN_S = 12.0


def _checkpoints(run):
    return sorted((run / "checkpoints").glob("ckpt-????????"))


@pytest.mark.job
def test_frozen_shard_then_sigterm_names_it_and_keeps_the_previous_checkpoint(
        tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2, steps=100000, read_own_pushes=False)
    cfg.write_text(cfg.read_text() + f"\n[checkpoint]\nevery_s = 0\nevery_steps = 100\n"
                                     f"deadline_s = {DEADLINE_S}\n")
    run = tmp_path / "run"
    frozen = None
    try:
        with start_job(5, ["train", str(cfg)]) as job:
            job.wait_for(lambda: _checkpoints(run), "a first checkpoint")
            pids = rank_pids(cfg)
            frozen = pids[2]  # world rank 2: shard 1
            os.kill(frozen, signal.SIGSTOP)
            before = ckpt_mod.find_latest(run)
            t = time.monotonic()
            for pid in pids.values():  # what SLURM does: SIGTERM to every task
                os.kill(pid, signal.SIGTERM)
            proc = job.wait()
            ended_s = time.monotonic() - t
    finally:
        if frozen is not None:  # never leave a stopped rank behind
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(frozen, sig)
                except ProcessLookupError:
                    pass
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert ended_s < DEADLINE_S + MARGIN_S, (ended_s, proc.stderr[-3000:])
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "rank 2 (shard 1 on " in lines[0] and f"pid {frozen})" in lines[0], lines[0]
    assert "rank 1 " not in lines[0] and "replica" not in lines[0], lines[0]
    # after SIGTERM, or (when the freeze caught a checkpoint in flight) for that checkpoint
    assert "did not answer within checkpoint.deadline_s = 3 s " in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    # nothing committed: the newest checkpoint is the one from before the freeze
    after = ckpt_mod.find_latest(run)
    assert before is not None and after.path == before.path
    assert _checkpoints(run)[-1] == before.path
    assert not (run / "summary.json").exists()
    # the same command (with a finite budget) resumes from it
    done = max(int(s) for s in before.workers[:, 0]) + 20
    again = run_job(5, ["train", str(cfg), "--set", f"downpour.steps={done}"])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == {"sequence": before.sequence, "steps": before.steps}
    assert summary["steps"] == 2 * done


@pytest.mark.parametrize("value", ["0", "-1"])
def test_deadline_must_be_positive(tmp_path, small_data, value):
    cfg = job_config(tmp_path, small_data, 2, 2)
    with pytest.raises(ConfigError, match=r"checkpoint\.deadline_s must be > 0"):
        load(cfg, [f"checkpoint.deadline_s={value}"])
    assert load(cfg, []).checkpoint.deadline_s == 20.0


def test_a_sigterm_ends_a_checkpoint_already_waiting_on_a_frozen_shard(monkeypatch):
    """Seen in CI: the freeze caught a periodic checkpoint with the workers paused, so no
    posted push showed the shard stuck; the wait warned every deadline_s for ever and the
    SIGTERM that came meanwhile was never looked at (the job hung until killed)."""
    from types import SimpleNamespace

    from dbmpi.faults import TERMINATION
    from dbmpi.protocol import Board
    from dbmpi.ps.server import RankUnreachable
    from dbmpi.train.downpour import coordinator as cmod

    monkeypatch.setattr(cmod, "stuck_shards", lambda ps: [])  # no push posted to it
    monkeypatch.setattr(TERMINATION, "requested", False)
    board = {Board.TERM: 0}
    me = SimpleNamespace(ps=None, _get=board.__getitem__, _ranks=lambda w, s: [2],
                         _who=lambda ranks: f"rank {ranks[0]} (shard 1)",
                         cfg=SimpleNamespace(checkpoint=SimpleNamespace(deadline_s=3.0)))
    me._unreachable = lambda *a: cmod.Coordinator._unreachable(me, *a)

    def overdue():
        cmod.Coordinator._overdue(me, "for checkpoint 3", [], [1], False)

    overdue()  # no signal: a slow write looks the same, so it warns and waits on
    want = (r"rank 2 \(shard 1\) did not answer within checkpoint.deadline_s = 3 s for "
            r"checkpoint 3")
    board[Board.TERM] = 1  # a worker's SIGTERM, relayed on the board
    with pytest.raises(RankUnreachable, match=want):
        overdue()
    board[Board.TERM] = 0
    monkeypatch.setattr(TERMINATION, "requested", True)  # the coordinator's own
    with pytest.raises(RankUnreachable, match=want):
        overdue()
