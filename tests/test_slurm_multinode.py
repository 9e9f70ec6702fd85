"""A 3-node SLURM cluster whose nodes are namespace hosts (``cluster.sh up DIR --netns 3``).

slurmctld runs in host 0 and one ``slurmd -N nodeK`` in each host (tests/netbed.py), so an
``sbatch -N 3`` job's ranks sit on three hosts and talk TCP. Clients (sbatch, squeue, sacct)
run in host 0 through ``cluster.sh exec``. The job runs tests/netbed_probe.py through srun
(PMI-2) and through MPICH's mpiexec inside the allocation; its report is checked against the
allocation and against numpy. Needs root, SLURM (installed with apt-get when missing) and
``ip netns``: skipped otherwise, failed under DBMPI_REQUIRE_SLURM=1 / DBMPI_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import MPIEXEC

from tests import netbed
from tests.netbed_probe import seeded, sha
from tests.test_slurm import CLUSTER, Cluster, _alive, _ensure_installed, _say

pytestmark = pytest.mark.job  # every test here runs SLURM jobs
ROOT = Path(__file__).resolve().parents[1]
NODES = 3
JOB = """#!/bin/bash
#SBATCH -J netprobe
#SBATCH -t 2
#SBATCH -o logs/%x-%j.out
# Between nodes TCP only (else UCX uses shared memory across namespaces); hydra's proxies
# find mpiexec by the bed interface's address (node names are not in DNS).
export UCX_TLS=tcp,self HYDRA_IFACE={iface}
echo "batch on $(hostname), nodes $SLURM_JOB_NODELIST"
if [ "$DBMPI_LAUNCHER" = mpiexec ]; then
    {mpiexec} -n "$SLURM_NTASKS" {python} -m mpi4py {probe} hosts
else
    srun --mpi=pmi2 {python} -m mpi4py {probe} hosts
fi
"""


class NetnsCluster(Cluster):
    """Clients run in host 0, where slurmctld listens on the bed's address."""

    def run(self, *cmd: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return super().run(str(CLUSTER), "exec", str(self.state), *cmd, env=env, **kw)

    @property
    def bed(self) -> str:
        return (self.state / "netbed").read_text().strip()


def _unavailable(request, reason: str):
    _say(request, f"multi-node SLURM tests not run: {reason}")
    for knob in ("DBMPI_REQUIRE_SLURM", "DBMPI_REQUIRE_NETNS"):
        if os.environ.get(knob) == "1":
            pytest.fail(f"{knob}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    if why := netbed.unavailable():
        _unavailable(request, why)
    _ensure_installed(request)
    state = Path(tempfile.mkdtemp(prefix="dbmpi-slurmnet-", dir="/tmp"))
    up = subprocess.run([str(CLUSTER), "up", str(state), "--netns", str(NODES)], check=False,
                        capture_output=True, text=True, timeout=120)
    bed = (state / "netbed").read_text().strip() if (state / "netbed").exists() else None
    try:
        if up.returncode != 0:
            _unavailable(request, f"the multi-node cluster did not start: {up.stderr.strip()}")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "DBMPI_LAUNCHER"))}
        project = tmp_path_factory.mktemp("netproject")
        (project / "logs").mkdir()
        (project / "jobs").symlink_to(ROOT / "jobs")  # job scripts source jobs/site.sh
        (project / "netprobe.sbatch").write_text(JOB.format(
            mpiexec=MPIEXEC, iface=netbed.IFACE, python=sys.executable,
            probe=ROOT / "tests" / "netbed_probe.py"))
        yield NetnsCluster(state, project, env)
    finally:
        subprocess.run([str(CLUSTER), "down", str(state)], check=False, capture_output=True,
                       timeout=120)
        pidfiles = [state / "slurmctld.pid", state / "munge" / "munged.pid",
                    *state.glob("slurmd-*.pid")]
        left = [str(p) for p in pidfiles if _alive(p, p.name.split("-")[0].split(".")[0])]
        if not left:
            shutil.rmtree(state, ignore_errors=True)
    assert not left, f"daemons still running after `cluster.sh down {state}`: {left}"
    assert bed is None or bed not in netbed.beds(), f"bed {bed} left after down"


def test_each_node_is_a_namespace_host(cluster):
    r = cluster.run("sinfo", "-h", "-N", "-o", "%N %T")
    assert r.stdout.split() == [w for k in range(NODES) for w in (f"node{k}", "idle")], r.stdout
    for k in range(NODES):
        show = cluster.run("scontrol", "show", "node", f"node{k}").stdout
        assert f"NodeAddr=10.213.0.{k + 1} NodeHostName=node{k}" in show, show
        pid = int((cluster.state / f"slurmd-node{k}.pid").read_text())
        ns = subprocess.run(["ip", "netns", "identify", str(pid)], check=True,
                            capture_output=True, text=True).stdout.strip()
        assert ns == f"{cluster.bed}-h{k}", f"slurmd of node{k} runs in {ns!r}"
        assert os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_mpi_job_spans_three_nodes(cluster, launcher):
    job = cluster.submit("-N", str(NODES), "-n", "4", "netprobe.sbatch",
                         env={"DBMPI_LAUNCHER": launcher})
    rec = cluster.wait(job)
    log = cluster.log("netprobe", job)
    assert (rec["state"], rec["exit_code"]) == ("COMPLETED", "0:0"), f"{rec}\n{log}"
    assert "batch on node0, nodes node[0-2]" in log, log
    ranks = json.loads([ln for ln in log.splitlines() if ln.startswith('{"ranks"')][-1])["ranks"]
    # SLURM's block distribution of 4 tasks on 3 nodes: 2, 1, 1.
    assert [x["name"] for x in ranks] == ["node0", "node0", "node1", "node2"]
    assert len({x["netns"] for x in ranks}) == NODES
    assert [x["shared"] for x in ranks] == [[0, 1], [0, 1], [2], [3]]
    for p, x in enumerate(ranks):
        assert x["recv_sha"] == sha(seeded((p - 1) % 4)), f"rank {p} received wrong data"
    assert {x["allreduce_sha"] for x in ranks} == {sha(sum(seeded(1000 + p) for p in range(4)))}


def test_placed_training_job_spans_three_nodes(cluster, small_data, tmp_path):
    """The README's multi-node job: ``sbatch -N 3 jobs/placed.sbatch CONFIG`` trains Downpour
    with the coordinator and the shard on node0 and one replica on each other node (dbmpi
    launch plans over the allocation), over TCP between the namespace hosts."""
    from conftest import write_config

    cfg = write_config(tmp_path / "job.toml", {
        "topology": {"shards": 1, "replicas": 2},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": small_data, "batch_size": 32},
        "downpour": {"steps": 150, "eval_every_s": 60.0},
        "run": {"seed": 1}})
    job = cluster.submit("-N", str(NODES), "--ntasks-per-node=2", "jobs/placed.sbatch", str(cfg),
                         env={"UCX_TLS": "tcp,self", "HYDRA_IFACE": netbed.IFACE})
    rec = cluster.wait(job)
    log = cluster.log("placed", job)
    assert (rec["state"], rec["exit_code"]) == ("COMPLETED", "0:0"), f"{rec}\n{log[-3000:]}"
    run = cluster.project / "runs" / f"placed-{job}"
    placed = json.loads((run / "placement.json").read_text())["ranks"]
    assert [(x["role"], x["host"]) for x in placed] == [
        ("coordinator", "node0"), ("shard", "node0"), ("replica", "node1"),
        ("replica", "node2")], placed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 300
    assert "final test accuracy" in log
