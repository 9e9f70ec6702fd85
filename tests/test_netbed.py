"""The multi-host test bed (tests/netbed.py): namespace hosts, MPI across them over TCP.

Each test makes its own small bed and removes it; MPI jobs run tests/netbed_probe.py under
``python -m mpi4py`` with a timeout, and what they report is checked against numpy and the
links' byte counters. Needs root and ``ip netns``: skipped otherwise (with the reason), a
failure under ``DBMPI_REQUIRE_NETNS=1`` (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import require_netns

from tests import netbed
from tests.netbed import IFACE, YIELD_ENV, Bed
from tests.netbed_probe import seeded, sha

ROOT = netbed.ROOT
PROBE = ROOT / "tests" / "netbed_probe.py"
pytestmark = pytest.mark.job  # beds and MPI jobs on them
JOB_TIMEOUT = 90  # s; each probe job takes 1-3 s here


@pytest.fixture(scope="module", autouse=True)
def _netns_available():
    require_netns("network namespace tests")


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True)
    return {ln.split(":")[1].strip() for ln in out.stdout.splitlines()}


def _rx_bytes(bed: Bed, host: int) -> int:
    out = subprocess.run(["ip", "-n", bed.ns(host), "-j", "-s", "link", "show", IFACE],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


def _probe(bed: Bed, np_: int, *args: str, check: bool = True,
           **where) -> subprocess.CompletedProcess:
    argv = bed.mpiexec_cmd(np_, [sys.executable, "-m", "mpi4py", str(PROBE), *args], **where)
    r = bed.run(argv, timeout=JOB_TIMEOUT, capture_output=True, text=True, cwd=ROOT,
                env={**os.environ, **YIELD_ENV})
    if check:
        assert r.returncode == 0, f"probe {args} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


def _wait_empty(bed: Bed, seconds: float = 10) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := bed.pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_up_and_down_leave_nothing_behind():
    before = _root_links()
    bed = Bed(2, name="updown").up()
    try:
        assert set(bed.namespaces) <= netbed._netns()
        assert _root_links() == before, "a bed must not add links to the root namespace"
        addr = subprocess.run(bed.exec_cmd(1, ["ip", "-o", "-4", "addr", "show", IFACE]),
                              check=True, capture_output=True, text=True, timeout=30).stdout
        assert f"{bed.addr(1)}/24" in addr
        name = subprocess.run(bed.exec_cmd(1, ["hostname"]), check=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        assert name == bed.ns(1)
        sleeper = subprocess.Popen(bed.exec_cmd(1, ["sleep", "300"]))
        deadline = time.monotonic() + 10
        while sleeper.pid not in bed.pids():  # ip netns exec -> unshare -> sh -> sleep (exec)
            assert time.monotonic() < deadline, "the sleeper never showed up in host 1"
            time.sleep(0.05)
    finally:
        removed = bed.down()
    assert sleeper.wait(timeout=10) != 0, "down() must stop processes inside the bed"
    assert set(removed) == set(bed.namespaces)
    assert not set(bed.namespaces) & netbed._netns()
    assert _root_links() == before
    assert bed.id not in netbed.beds()


def test_stale_beds_are_found_and_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process: the bed it "owns" is stale
    orphan = Bed(2, name="stale", owner=dead.pid).up()
    sleeper = subprocess.Popen(orphan.exec_cmd(0, ["sleep", "300"]))
    with Bed(1, name="alive") as mine:
        assert orphan.id in {b.id for b in netbed.stale()}
        assert mine.id not in {b.id for b in netbed.stale()}
        r = subprocess.run([sys.executable, "-m", "tests.netbed", "down", "--stale"], cwd=ROOT,
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"removed {orphan.id}" in r.stderr
        assert mine.id in netbed.beds() and orphan.id not in netbed.beds()
    assert sleeper.wait(timeout=10) != 0
    assert not [ns for ns in netbed._netns() if ns.startswith((orphan.id, mine.id))]


@pytest.mark.parametrize("transport, intra, rank_hosts", [
    ("ucx", "shm", None),             # even blocks: hosts 0, 0, 1, 2
    ("ofi", "shm", None),
    ("ucx", "tcp", None),             # MPIR_CVAR_NOLOCAL=1: every rank is its own node
    ("ucx", "shm", [2, 2, 0, 1]),     # an explicit map
])
def test_ranks_across_three_hosts(transport, intra, rank_hosts):
    with Bed(3, name="three") as bed:
        rx = [_rx_bytes(bed, h) for h in range(3)]
        r = _probe(bed, 4, "hosts", transport=transport, intra=intra, rank_hosts=rank_hosts)
        ranks = json.loads(r.stdout.strip().splitlines()[-1])["ranks"]
        where = bed.placement(4, rank_hosts=rank_hosts)
        assert [x["name"] for x in ranks] == [bed.ns(h) for h in where]
        netns = {h: {x["netns"] for x, w in zip(ranks, where) if w == h} for h in set(where)}
        assert all(len(v) == 1 for v in netns.values()), netns  # one namespace per host
        assert len(set().union(*netns.values())) == len(netns)  # and a different one each
        if intra == "shm":
            groups = [[q for q in range(4) if where[q] == where[p]] for p in range(4)]
        else:
            groups = [[p] for p in range(4)]
        assert [x["shared"] for x in ranks] == groups
        for p, x in enumerate(ranks):  # independent references: numpy on the seeded arrays
            assert x["recv_sha"] == sha(seeded((p - 1) % 4)), f"rank {p} received wrong data"
        total = sum(seeded(1000 + p) for p in range(4))
        assert {x["allreduce_sha"] for x in ranks} == {sha(total)}
        # Every host received at least the 1 MiB ring message over its link: TCP, not memory.
        for h in range(3):
            assert _rx_bytes(bed, h) - rx[h] >= 8 * seeded(0).size, f"host {h} link unused"


def test_tbf_shaped_link_runs_at_its_rate():
    nbytes, reps = 32 << 20, 3  # 0.27 s per transfer at 1 Gbit/s
    with Bed(2, name="rate") as bed:
        fast = json.loads(_probe(bed, 2, "bw", str(nbytes), str(reps)).stdout.splitlines()[-1])
        bed.shape("1gbit")
        slow = json.loads(_probe(bed, 2, "bw", str(nbytes), str(reps)).stdout.splitlines()[-1])
    gbit = slow["best_GBps"] * 8
    assert 0.75 <= gbit <= 1.05, f"1gbit link measured {gbit:.3f} Gbit/s"
    assert fast["best_GBps"] * 8 > 1.5 * gbit, f"unshaped {fast}, shaped {slow}"


def test_failing_rank_aborts_the_job_and_leaves_nothing():
    with Bed(2, name="fail") as bed:
        t = time.monotonic()
        r = _probe(bed, 3, "fail", check=False)
        assert r.returncode != 0
        assert "rank 2 fails on purpose" in r.stderr, r.stderr[-2000:]
        assert time.monotonic() - t < 60, "the abort took too long"
        assert not _wait_empty(bed), f"processes left in the bed: {bed.pids()}"


def test_cli_mpiexec_makes_and_removes_its_bed():
    r = subprocess.run([sys.executable, "-m", "tests.netbed", "mpiexec", "--hosts", "2",
                        "-n", "3", "--timeout", "60", "--", sys.executable, "-m", "mpi4py",
                        str(PROBE), "hosts"], cwd=ROOT, check=False, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "DBMPI_NETBED": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(r.stdout.strip().splitlines()[-1])["ranks"]
    assert [x["shared"] for x in ranks] == [[0, 1], [0, 1], [2]]
    assert "rank hosts [0, 0, 1]" in r.stderr
    bed_id = r.stderr.split(" ranks on bed ")[1].split(",")[0]
    assert bed_id.endswith("-job") and bed_id not in netbed.beds()


def test_cli_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "tests.netbed", "up", "--hosts", "2",
                        "--rate", "fast"], cwd=ROOT, check=False, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "rate 'fast' is not like 10gbit" in r.stderr
    with pytest.raises(netbed.NetbedError, match="need one host in 0..1 for each of 3 ranks"):
        Bed(2, name="x").placement(3, rank_hosts=[0, 2, 1])


def test_owner_exit_or_sigterm_removes_its_bed():
    """A bed goes with the process that made it: at exit (atexit) and on SIGTERM."""
    code = "from tests.netbed import Bed; print(Bed(1, name='atexit').up().id)"
    gone = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    assert gone.endswith("-atexit") and gone not in netbed.beds()
    job = subprocess.Popen([sys.executable, "-m", "tests.netbed", "mpiexec", "--hosts", "2",
                            "-n", "2", "--", "sleep", "300"], cwd=ROOT, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "DBMPI_NETBED": ""})
    try:
        bed_id = f"{netbed.PREFIX}-{job.pid}-job"
        deadline = time.monotonic() + 30
        while not (bed_id in netbed.beds() and len(netbed.beds()[bed_id].pids()) >= 2):
            assert time.monotonic() < deadline and job.poll() is None, "the job never started"
            time.sleep(0.1)
        job.terminate()
        assert job.wait(timeout=30) == -15
    finally:
        job.kill()
    assert bed_id not in netbed.beds(), "SIGTERM must remove the bed and what runs in it"
