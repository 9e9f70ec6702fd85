"""The launcher's environment and command line, and rank placement (``--hosts``)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import JOB_ENV, ROOT, remove_stale_mpich_segments, require_netns, write_config

from dbmpi import launch, placement


def test_yield_settings_only_when_oversubscribed(monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    env = launch.launch_env(5, 2, env={})
    assert env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    env = launch.launch_env(2, 1, env={})
    assert "MPIR_CVAR_ENABLE_HEAVY_YIELD" not in env
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # one core left to the coordinator/shards
    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    assert launch.launch_env(7, 3, env={})["OPENBLAS_NUM_THREADS"] == "5"
    assert launch.launch_env(3, 3, env={})["OPENBLAS_NUM_THREADS"] == "5"
    env = launch.launch_env(5, 2, env={"OPENBLAS_NUM_THREADS": "4",
                                       "MPIR_CVAR_POLLS_BEFORE_YIELD": "9"})
    assert env["OPENBLAS_NUM_THREADS"] == "4" and env["MPIR_CVAR_POLLS_BEFORE_YIELD"] == "9"


def test_command_has_rank_count_and_overrides():
    cmd = launch.command("c.toml", ["a.b=1"], 7, "mpiexec")
    assert cmd[:3] == ["mpiexec", "-n", "7"]
    assert cmd[3:8] == [sys.executable, "-m", "mpi4py", "-m", "dbmpi"]
    assert cmd[-4:] == ["train", "c.toml", "--set", "a.b=1"]


# ---------------------------------------------------------------- placement (--hosts)

DEMO = ["jobs/configs/demo.toml"]  # 2 shards, 2 replicas: 5 ranks


def _launch(*args: str, env: dict | None = None, timeout: float = 60):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "dbmpi", "launch", *args], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


def _table(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["rank", "role", "index", "partition", "host"], stdout
    return [ln.split() for ln in lines[1:]]


def test_placed_command_puts_the_host_list_first():
    places = placement.plan(1, 1, 1, placement.parse_hosts("a:2,b:1"))
    cmd = launch.placed_command(launch.command("c.toml", [], 3, "mpiexec"), places)
    assert cmd[:5] == ["mpiexec", "-hosts", "a:2,b:1", "-n", "3"]


def test_dry_run_prints_the_table_and_the_command():
    r = _launch(*DEMO, "--hosts", "a:4,b:2,c:2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert _table(r.stdout) == [["0", "coordinator", "0", "0", "a"], ["1", "shard", "0", "0", "a"],
                                ["2", "shard", "1", "0", "a"], ["3", "replica", "0", "0", "b"],
                                ["4", "replica", "1", "0", "c"]]
    assert " -hosts a:3,b:1,c:1 -n 5 " in r.stderr, r.stderr
    r = _launch(*DEMO, "--hosts", "a:2,b:2,c:2", "--ps-hosts", "b,c", "--set",
                "topology.shards=3", "--dry-run")
    # b: coordinator (load 1); shards c, b (tie, b first in --ps-hosts), c; replicas on a
    assert [row[-1] for row in _table(r.stdout)] == ["b", "b", "c", "c", "a", "a"]


def test_dry_run_under_slurm_uses_the_allocation():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "3,2(x2)",
           "PATH": str(Path(sys.executable).parent)}  # no scontrol: the parser expands n[1-3]
    r = _launch(*DEMO, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert [row[-1] for row in _table(r.stdout)] == ["n1", "n1", "n1", "n2", "n3"]
    assert " -hosts n1:3,n2:1,n3:1 -n 5 " in r.stderr


def test_launch_errors_are_one_line_with_status_2(tmp_path):
    for args, words in [(["--hosts", "a:1,b:2"], "needs 5 ranks"),
                        (["--ps-hosts", "a"], "--ps-hosts needs the hosts"),
                        (["--hosts", "a:5", "--hostfile", "f"], "give one of them"),
                        (["--hosts", "a:2,b:2,c:2,d:2,e:2", "--set", "topology.partitions=3"],
                         "largest host has 2 slots")]:
        r = _launch(*DEMO, *args, "--dry-run")
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("dbmpi: error")]
        assert r.returncode == 2 and len(errors) == 1 and words in errors[0], (args, r.stderr)


def test_rankfile_is_written(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=3\nb slots=2\n")
    rf = tmp_path / "rankfile"
    r = _launch(*DEMO, "--hostfile", str(hostfile), "--rankfile", str(rf), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert rf.read_text().splitlines() == ["rank 0=a slot=0", "rank 1=a slot=1",
                                           "rank 2=a slot=2", "rank 3=b slot=0",
                                           "rank 4=b slot=1"]
    assert f"--rankfile {rf}" in r.stderr


# Real runs. Ranks on different hosts are simulated with one UTS namespace per host (its own
# hostname, so MPI.Get_processor_name tells them apart): this script is hydra's "rsh".
UTS_RSH = """#!/bin/sh
# HOST CMD...: run CMD here, in a new UTS namespace whose hostname is HOST
host=$1; shift
exec unshare --uts /bin/sh -c 'hostname "$0" && exec /bin/sh -c "$*"' "$host" "$@"
"""
WHO = """from mpi4py import MPI
c = MPI.COMM_WORLD
names = c.gather(MPI.Get_processor_name())
if c.rank == 0:
    print(",".join(names))
"""


def _uts_rsh(tmp_path: Path) -> Path:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("simulated hosts need root and unshare (UTS namespaces)")
    probe = subprocess.run(["unshare", "--uts", "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare --uts is not permitted here")
    script = tmp_path / "uts-rsh"
    script.write_text(UTS_RSH)
    script.chmod(0o755)
    return script


def _kill_ranks(marker: str) -> None:
    """SIGKILL the processes whose command line holds ``marker`` (this test's own file):
    hydra starts each rank in a session of its own, out of reach of killpg."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _run_group(cmd, env, timeout, marker: str, cwd=ROOT):
    """Run a job in its own session; on timeout kill it all (mpiexec and its proxies by
    group, the ranks by ``marker``) and return None."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_ranks(marker)
        proc.communicate()
        remove_stale_mpich_segments()
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.job
def test_hydra_keeps_the_planned_rank_order(tmp_path):
    """The -hosts list that launch builds puts every rank on its planned host, including a
    host named twice (ha:2,hb:2,hc:1,ha:1)."""
    rsh = _uts_rsh(tmp_path)
    (tmp_path / "who.py").write_text(WHO)
    places = placement.plan(2, 3, 1, placement.parse_hosts("ha:3,hb:2,hc:1"), ["ha", "hb"])
    assert placement.hydra_hosts(places) == "ha:2,hb:2,hc:1,ha:1"
    cmd = launch.placed_command([launch.find_mpiexec(), "-n", str(len(places)), sys.executable,
                                 str(tmp_path / "who.py")], places)
    env = {**os.environ, **JOB_ENV, "HYDRA_LAUNCHER": "rsh", "HYDRA_LAUNCHER_EXEC": str(rsh)}
    r = _run_group(cmd, env, timeout=60, marker=str(tmp_path / "who.py"))
    assert r is not None and r.returncode == 0, r and r.stderr
    assert r.stdout.split() == [",".join(p.host for p in places)]


def _tiny_config(tmp_path: Path, data: Path, replicas: int, partitions: int) -> Path:
    return write_config(tmp_path / "job.toml", {
        "topology": {"shards": 1, "replicas": replicas, "partitions": partitions},
        "model": {"layers": [{"type": "dense", "units": 32, "activation": "relu"},
                             {"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": data, "batch_size": 32},
        "downpour": {"steps": 30, "eval_every_s": 60.0, "log_every": 10},
        "run": {"dir": tmp_path / "run"}})


def _placement_rows(run: Path) -> list[tuple]:
    rows = json.loads((run / "placement.json").read_text())["ranks"]
    assert all(isinstance(x["pid"], int) and x["pid"] > 0 for x in rows)
    return [(x["rank"], x["role"], x["index"], x["partition"], x["host"]) for x in rows]


@pytest.mark.job
def test_launch_on_one_host_logs_and_records_placement(small_data, tmp_path):
    cfg = _tiny_config(tmp_path, small_data, replicas=2, partitions=1)
    r = _launch(str(cfg), "--hosts", "localhost:4", env={**JOB_ENV, "DBMPI_LOG_LEVEL": "DEBUG"},
                timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    host = subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_processor_name())"],
        capture_output=True, text=True, check=True).stdout.strip()
    expect = [(p.rank, p.role, p.index, p.partition, host)
              for p in placement.plan(1, 2, 1, placement.parse_hosts("localhost:4"))]
    assert _placement_rows(tmp_path / "run") == expect
    lines = [ln.split(" INFO ", 1)[1] for ln in r.stderr.splitlines()
             if f" INFO host {host}:" in ln]
    # every rank's own DEBUG line, with the pid placement.json holds for it
    pids = {x["rank"]: x["pid"]
            for x in json.loads((tmp_path / "run/placement.json").read_text())["ranks"]}
    for rank, pid in pids.items():
        assert sum(f"[rank {rank} " in ln and f"DEBUG on host {host}, pid {pid}" in ln
                   for ln in r.stderr.splitlines()) == 1, (rank, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(
        f"host {host}: rank 0 coordinator (pid ") and "ranks 2-3 replicas 0-1 (pids " in lines[0]


@pytest.mark.job
def test_launch_on_three_simulated_hosts(small_data, tmp_path):
    """1 coordinator + 1 shard + 2 replicas x 2 partitions on ha:2, hb:2, hc:2."""
    rsh = _uts_rsh(tmp_path)
    cfg = _tiny_config(tmp_path, small_data, replicas=2, partitions=2)
    hosts = "ha:2,hb:2,hc:2"
    env = {**os.environ, **JOB_ENV, "HYDRA_LAUNCHER": "rsh", "HYDRA_LAUNCHER_EXEC": str(rsh),
           "UCX_TLS": "tcp,self"}  # between hosts: TCP, as over a network
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    # 10-40 s here when it works; a hang (below) costs the whole timeout, so keep it short
    r = _run_group([sys.executable, "-m", "dbmpi", "launch", str(cfg), "--hosts", hosts], env,
                   timeout=60, marker=str(cfg))
    expect = [(p.rank, p.role, p.index, p.partition, p.host)
              for p in placement.plan(1, 2, 2, placement.parse_hosts(hosts))]
    assert [h for *_, h in expect] == ["ha", "ha", "hb", "hb", "hc", "hc"]
    # written at start-up, before training: the ranks landed where planned
    assert _placement_rows(tmp_path / "run") == expect
    assert r is not None, "placement right, but training did not finish in time"
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in r.stdout


@pytest.mark.job
def test_launch_on_a_network_namespace_bed(small_data, tmp_path):
    """The same job on three hosts made of network namespaces (tests/netbed.py): own
    hostnames, own addresses, TCP between them. launch runs in host 0 and places by address."""
    from tests import netbed

    require_netns("the launch on a network namespace bed")
    cfg = _tiny_config(tmp_path, small_data, replicas=2, partitions=2)
    with netbed.Bed(3, name="place") as bed:
        hosts = ",".join(f"{bed.addr(h)}:2" for h in range(3))
        env = {**JOB_ENV, "DBMPI_NETBED": bed.id, **netbed.TRANSPORTS["ucx"],
               "HYDRA_LAUNCHER": "rsh", "HYDRA_LAUNCHER_EXEC": str(netbed.EXEC),
               "HYDRA_IFACE": netbed.IFACE}
        argv = bed.exec_cmd(0, ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable,
                                "-m", "dbmpi", "launch", str(cfg), "--hosts", hosts])
        try:
            r = bed.run(argv, timeout=60, cwd=ROOT, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            r = None
        names = {bed.addr(h): bed.ns(h) for h in range(3)}  # a host's hostname: its namespace
        expect = [(p.rank, p.role, p.index, p.partition, names[p.host])
                  for p in placement.plan(1, 2, 2, placement.parse_hosts(hosts))]
    assert [h for *_, h in expect] == [bed.ns(h) for h in (0, 0, 1, 1, 2, 2)]
    assert _placement_rows(tmp_path / "run") == expect
    assert r is not None, "placement right, but training did not finish in time"
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in r.stdout
