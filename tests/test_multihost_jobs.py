"""Whole Downpour and Sandblaster jobs with their ranks on 3 namespace hosts over TCP.

The coordinator and the shards sit on host 0 and the replicas on hosts 1 and 2 of a bed
(tests/netbed.py), so every fetch, push and control word crosses MPI's network path (UCX over
TCP between hosts; libfabric's tcp provider for one run): the shards take pushes into their
inboxes and must make progress for the replicas. Each deterministic job is compared bit for
bit with the same job on one node through shared memory, which the rest of the suite checks
against serial numpy references (tests/test_jobs.py, tests/test_sandblaster.py). Needs root
and ``ip netns``: skipped otherwise, a failure under ``DBMPI_REQUIRE_NETNS=1`` (CI).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from conftest import JOB_ENV, ROOT, Job, rank_pids, require_netns, run_job, write_config

from dbmpi import launch, supervise
from dbmpi.checkpoint import load_params
from tests.netbed import Bed, mpiexec

pytestmark = pytest.mark.job  # every test here starts MPI jobs
JOB_TIMEOUT = 300  # s, a last guard for a job on the bed: each takes 5-40 s here


@pytest.fixture(scope="module", autouse=True)
def _netns_available():
    require_netns("multi-host jobs")


@pytest.fixture(scope="module")
def bed():
    with Bed(3, name="jobs") as b:
        yield b


def _on_bed(bed: Bed, rank_hosts: list[int], cfg, transport: str = "ucx"):
    argv = bed.mpiexec_cmd(len(rank_hosts), [sys.executable, "-m", "mpi4py", "-m", "dbmpi",
                                             "train", str(cfg)],
                           rank_hosts=rank_hosts, transport=transport)
    return bed.run(argv, timeout=JOB_TIMEOUT, capture_output=True, text=True, cwd=ROOT,
                   env={**os.environ, **JOB_ENV})


def _keep_going(argv: list[str]) -> list[str]:
    """The bed's mpiexec line as ``dbmpi launch`` runs Downpour: -disable-auto-cleanup, each
    rank under the keep-going shell (dbmpi.launch.KEEP_GOING)."""
    i = next(k for k, a in enumerate(argv) if a == mpiexec())
    j = argv.index(sys.executable)
    return [*argv[:i + 1], "-disable-auto-cleanup", *argv[i + 1:j], "sh", "-c",
            launch.KEEP_GOING, "sh", *argv[j:]]


def _downpour(path, data, run_dir, replicas: int, steps: int, **downpour):
    return write_config(path, {
        "topology": {"shards": 2, "replicas": replicas},
        "model": {"layers": [{"type": "dense", "units": 32, "activation": "relu"}]},
        "data": {"path": data, "batch_size": 32},
        "optimizer": {"name": "adagrad", "learning_rate": 0.05},
        "downpour": {"steps": steps, "eval_every_s": 60.0, **downpour},
        "checkpoint": {"every_steps": steps // 2},
        "run": {"dir": run_dir, "seed": 3}})


@pytest.mark.parametrize("transport", ["ucx", "ofi"])
def test_downpour_across_hosts_equals_the_same_job_on_one_node(tmp_path, small_data, bed,
                                                               transport):
    """One replica reading its own pushes is deterministic: its parameters after 200 steps
    through the shards' inboxes over TCP are the on-node job's, bit for bit."""
    params = {}
    for where in ("one-node", "hosts"):
        cfg = _downpour(tmp_path / f"{where}.toml", small_data, tmp_path / where, 1, 200,
                        read_own_pushes=True)
        proc = (run_job(4, ["train", str(cfg)]) if where == "one-node"
                else _on_bed(bed, [0, 0, 0, 1], cfg, transport))
        assert proc.returncode == 0, proc.stderr[-3000:]
        params[where], _ = load_params(tmp_path / where / "params.h5")
        # on one node the shards read the replica's memory; across hosts it puts into them
        shards = [json.loads(line) for line in (tmp_path / where / "metrics.jsonl").open()]
        inbox = [r["inbox_workers"] for r in shards if r["kind"] == "shard"]
        assert inbox == ([0, 0] if where == "one-node" else [1, 1])
    np.testing.assert_array_equal(params["hosts"], params["one-node"])


def test_two_replicas_on_two_hosts_train_to_the_end(tmp_path, small_data, bed):
    """Asynchronous Downpour with the replicas on hosts 1 and 2 and the shards on host 0: every
    push is applied (the shards' counts add up to the replicas'), a checkpoint is written
    mid-run, and the model learns."""
    steps = 400
    cfg = _downpour(tmp_path / "job.toml", small_data, tmp_path / "run", 2, steps,
                    warm_start_steps=50, log_every=25)
    proc = _on_bed(bed, [0, 0, 0, 1, 2], cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 * steps
    assert summary["final_test_accuracy"] > 0.3  # far above the 10% of chance
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    applied = [r["pushes_applied"] for r in recs if r["kind"] == "shard"]
    assert applied == [2 * steps, 2 * steps]  # n_push = 1: one push per step per replica
    assert any(r["kind"] == "checkpoint" and not r["final"] for r in recs)
    train = [r for r in recs if r["kind"] == "train"]
    assert {r["replica"] for r in train} == {0, 1}
    assert all(r["ctrl_fraction"] < 0.5 for r in train)


def test_a_replica_killed_on_another_host_is_lost_and_the_job_goes_on(tmp_path, small_data,
                                                                      bed):
    """Over TCP between namespace hosts: SIGKILL of the replica on host 2; the coordinator on
    host 0 counts it lost, replica 0 on host 1 finishes, the job exits 0. (A host whose hydra
    proxy dies with it ends the job instead: mpiexec 5.0.2 fails an assertion, docs/faults.md.)
    """
    cfg = _downpour(tmp_path / "job.toml", small_data, tmp_path / "run", 2, 600,
                    log_every=10, lost_after_s=2)
    argv = _keep_going(bed.mpiexec_cmd(5, [sys.executable, "-m", "mpi4py", "-m", "dbmpi",
                                           "train", str(cfg)], rank_hosts=[0, 0, 0, 1, 2]))
    started = time.time() - 1
    with Job(argv, {**os.environ, **JOB_ENV}, ROOT, run_dir=tmp_path / "run") as job:
        job.wait_for(lambda: 4 in rank_pids(cfg) and _steps_of(tmp_path / "run", 1) >= 50,
                     "replica 1's 50th step")
        os.kill(rank_pids(cfg)[4], signal.SIGKILL)
        proc = job.wait()
    status = 128 - proc.returncode if proc.returncode < 0 else proc.returncode  # as sh says it
    if status == supervise.SIGPIPE_STATUS:  # hydra's end-of-job race: judged as launch does
        status = supervise.status_after_sigpipe(str(tmp_path / "run"), started, [])
    assert status == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    [loss] = summary["replicas_lost"]
    assert loss["replica"] == 1 and f"rank 4 (replica 1 on {bed.ns(2)}, pid" in loss["who"]
    assert summary["replica_steps"][0] == 600
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    applied = [r["pushes_applied"] for r in recs if r["kind"] == "shard"]
    assert applied == [600 + loss["pushes_applied_per_shard"][0]] * 2


def _steps_of(run, replica: int) -> int:
    step = 0
    for f in (run / "metrics").glob("rank-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("replica") == replica:
                step = max(step, rec["step"])
    return step


def test_sandblaster_across_hosts_equals_the_same_job_on_one_node(tmp_path, small_data, bed):
    """Sandblaster's shard-local vector math and its replicas' pushes over TCP give the
    on-node run's parameters bit for bit (uninitialised window memory off-node once made
    this run finish with wrong numbers and no error)."""
    params = {}
    for where in ("one-node", "hosts"):
        cfg = write_config(tmp_path / f"{where}.toml", {
            "topology": {"shards": 2, "replicas": 2},
            "model": {"layers": [{"type": "dense", "units": 16, "activation": "tanh"}]},
            "data": {"path": small_data},
            "sandblaster": {"iterations": 8, "history": 5, "portion_size": 100,
                            "push_every": 2, "l2": 1e-4},
            "run": {"dir": tmp_path / where, "seed": 0}})
        cfg.write_text('algorithm = "sandblaster"\n' + cfg.read_text())
        proc = (run_job(5, ["train", str(cfg)]) if where == "one-node"
                else _on_bed(bed, [0, 0, 0, 1, 2], cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        params[where], _ = load_params(tmp_path / where / "params.h5")
    np.testing.assert_array_equal(params["hosts"], params["one-node"])
