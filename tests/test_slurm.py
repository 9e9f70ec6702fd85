"""The job scripts (jobs/*.sbatch) against a real one-node SLURM cluster.

A module fixture brings up munged, slurmctld and slurmd with ``jobs/slurm/cluster.sh`` (all
state in a throwaway directory under /tmp, free ports), installing Debian's packages with
apt-get first when they are missing and we are root. Each test submits a real job with
``sbatch`` from a scratch project directory (``jobs`` linked to this repository's), waits for
it, and checks what the scheduler recorded (``sacct -c``: state and exit code), the job's log
``logs/%x-%j.out`` and what the job wrote. The daemons are stopped by pid at the end.

Where SLURM cannot run (not root, apt-get fails, the daemons do not start) the module is
skipped and the reason is printed; with ``DBMPI_REQUIRE_SLURM=1`` (CI) that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import JobStalled, file_sizes, run_command, wait_while_advancing

pytestmark = pytest.mark.job  # SLURM jobs (and jobs/local.sh)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "jobs" / "slurm" / "cluster.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
STEPS = 100
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class Cluster:
    state: Path    # the cluster's directory (slurm.conf, logs, pid files)
    project: Path  # where jobs are submitted from: jobs -> ROOT/jobs, logs/, data/
    env: dict

    def run(self, *cmd: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), check=False, cwd=self.project, capture_output=True,
                              env={**self.env, **(env or {})}, text=True, timeout=60, **kw)

    def submit(self, *args: str, env: dict | None = None) -> str:
        r = self.run("sbatch", "--parsable", *args, env=env)
        assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
        return r.stdout.strip().split(";")[0]

    def queue_state(self, job: str) -> str:
        """The job's state in the queue ('' once it left it, epilog included)."""
        return self.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()

    def progress(self, job: str, run_dir: Path | None = None) -> tuple:
        """What changes while the job advances: its queue state, its log, its metrics."""
        watch = [self.project / "logs" / f"*-{job}.out"]
        if run_dir is not None:
            watch.append(Path(run_dir) / "metrics" / "rank-*.jsonl")
        return (self.queue_state(job), *file_sizes(watch))

    def wait_for(self, job: str, pred, what: str, run_dir: Path | None = None):
        """Wait until ``pred()`` holds while the job advances (scancel and fail otherwise)."""
        try:
            return wait_while_advancing(pred, lambda: self.progress(job, run_dir),
                                        f"SLURM job {job}: {what}", poll_s=0.3,
                                        describe=lambda: self.describe(job))
        except JobStalled:
            self.run("scancel", job)
            raise

    def wait(self, job: str, run_dir: Path | None = None) -> dict:
        """Wait for the job to end (epilog included) while it advances; return its
        ``sacct -c`` record."""
        def ended():
            if self.queue_state(job):  # pending, running or completing
                return None
            r = self.run("sacct", "-c", "-n", "-P", "-j", job, "-o", "JobID,JobName,State,ExitCode")
            for line in r.stdout.splitlines():
                jobid, name, state, exit_code = line.split("|")
                if jobid == job and state.split()[0] in FINAL_STATES:
                    return {"name": name, "state": state.split()[0], "exit_code": exit_code}
            return None
        return self.wait_for(job, ended, "the end of the job", run_dir)

    def describe(self, job: str) -> str:
        return f"{self.run('scontrol', 'show', 'job', job).stdout}\n{self.daemon_logs()}"

    def log(self, name: str, job: str) -> str:
        path = self.project / "logs" / f"{name}-{job}.out"
        assert path.is_file(), f"no job log {path}; logs/ has {os.listdir(path.parent)}"
        return path.read_text()

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {p.name} (tail)\n" + "\n".join(p.read_text().splitlines()[-15:])
                         for p in sorted((self.state / "log").glob("*.log")))


def _alive(pidfile: Path, name: str) -> bool:
    """The pid in PIDFILE runs NAME and is not a zombie (exited, not yet reaped by init)."""
    try:
        pid = pidfile.read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return Path(f"/proc/{pid}/comm").read_text().strip() == name and state != "Z"
    except (OSError, ValueError, IndexError):
        return False


def _pidfiles(state: Path) -> dict[str, Path]:
    return {"munged": state / "munge" / "munged.pid", "slurmctld": state / "slurmctld.pid",
            "slurmd": state / "slurmd.pid"}


def _say(request, message: str) -> None:
    """Print on the terminal now, past pytest's output capture."""
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"\ntests/test_slurm.py: {message}", yellow=True)


def _unavailable(request, reason: str):
    """Skip (or fail under DBMPI_REQUIRE_SLURM=1) and say why on the terminal."""
    _say(request, f"SLURM tests not run: {reason}")
    if os.environ.get("DBMPI_REQUIRE_SLURM") == "1":
        pytest.fail(f"DBMPI_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _ensure_installed(request) -> None:
    have = all(os.access(f"/usr/sbin/{d}", os.X_OK) for d in DAEMONS) and shutil.which("sbatch")
    if have:
        return
    if os.geteuid() != 0:
        _unavailable(request, "SLURM is not installed and installing it (apt-get) needs root")
    if not shutil.which("apt-get"):
        _unavailable(request, "SLURM is not installed and there is no apt-get to install it")
    t0 = time.monotonic()
    r = subprocess.run([str(CLUSTER), "install"], check=False, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-8:])
        _unavailable(request, f"`jobs/slurm/cluster.sh install` (apt-get) failed:\n{tail}")
    _say(request, f"installed SLURM and munge with apt-get in {time.monotonic() - t0:.0f} s")


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable(request, "slurmd must run as root and this is not root")
    _ensure_installed(request)
    # Short path under /tmp: the munge and slurmstepd sockets live in it (108-byte limit).
    state = Path(tempfile.mkdtemp(prefix="dbmpi-slurm-", dir="/tmp"))
    up = subprocess.run([str(CLUSTER), "up", str(state)], check=False, capture_output=True,
                        text=True, timeout=120)
    try:
        if up.returncode != 0:
            _unavailable(request, f"the SLURM daemons did not start: {up.stderr.strip()}")
        # The test's own environment minus anything from an enclosing SLURM job.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "DBMPI_LAUNCHER"))}
        env["SLURM_CONF"] = str(state / "slurm.conf")
        project = tmp_path_factory.mktemp("project")
        (project / "jobs").symlink_to(ROOT / "jobs")
        (project / "logs").mkdir()
        data_env = {**env, "PYTHONPATH": str(ROOT)}
        for cmd in (["synth", "--out", "data/idx", "--train", "2000", "--test", "400"],
                    ["shard", "idx", "--src", "data/idx", "--out", "data/shards", "--shards", "4"]):
            subprocess.run([sys.executable, "-m", "data_tools", *cmd], cwd=project, env=data_env,
                           check=True, capture_output=True, timeout=120)
        yield Cluster(state, project, env)
    finally:
        subprocess.run([str(CLUSTER), "down", str(state)], check=False, capture_output=True,
                       timeout=120)
        left = [d for d, f in _pidfiles(state).items() if _alive(f, d)]
        if not left:
            shutil.rmtree(state, ignore_errors=True)
    assert not left, f"daemons still running after `cluster.sh down {state}`: {left}"


def test_expand_nodelist_agrees_with_scontrol(request, tmp_path):
    # dbmpi's own parser (used where scontrol is absent) against SLURM's; installed here,
    # not skipped, when SLURM is missing and we may install it
    from test_placement import NODELISTS

    from dbmpi.placement import expand_nodelist

    _ensure_installed(request)
    # scontrol wants a configuration even to expand names: a minimal one will do
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")
    for spec in NODELISTS:
        r = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True,
                           text=True, check=False, timeout=30,
                           env={**os.environ, "SLURM_CONF": str(conf)})
        assert r.returncode == 0, r.stderr
        assert expand_nodelist(spec) == r.stdout.split(), spec


def test_cluster_is_up(slurm):
    r = slurm.run("sinfo", "-h", "-o", "%P %T %c")
    assert r.returncode == 0 and "idle" in r.stdout, r.stdout + r.stderr
    assert all(_alive(f, d) for d, f in _pidfiles(slurm.state).items())


# srun through the demo wrapper; mpiexec through the generic script with sbatch -n.
@pytest.mark.parametrize("launcher, script, name, sbatch_args", [
    ("srun", "jobs/demo.sbatch", "demo", []),
    ("mpiexec", "jobs/train.sbatch", "train", ["-n", "5"]),
])
def test_training_job(slurm, launcher, script, name, sbatch_args):
    run_dir = f"runs/{launcher}"
    train_args = [] if name == "demo" else ["jobs/configs/demo.toml"]
    job = slurm.submit(*sbatch_args, script, *train_args, "--set", f"downpour.steps={STEPS}",
                       "--set", "data.path=data/shards", "--set", f"run.dir={run_dir}",
                       env={"DBMPI_LAUNCHER": launcher})
    rec = slurm.wait(job, slurm.project / run_dir)
    log = slurm.log(name, job)
    assert (rec["state"], rec["exit_code"]) == ("COMPLETED", "0:0"), f"{rec}\n{log}"
    assert rec["name"] == name
    assert f"5 tasks on {os.uname().nodename.split('.')[0]} via {launcher}" in log, log
    assert "final test accuracy" in log and f"run directory: {run_dir}" in log, log
    if launcher == "srun":  # srun -l labels lines with the task id; rank 0 prints the result
        assert "0: final test accuracy" in log, log
    summary = json.loads((slurm.project / run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS * summary["topology"]["replicas"] == 2 * STEPS
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert len(summary["ranks"]) == 5


def test_requeued_job_resumes(slurm):
    """scontrol requeue: SIGTERM (a checkpoint, exit 143), the job runs again with the same id
    and run directory, resumes from the checkpoint and completes."""
    job = slurm.submit("-n", "5", "jobs/train.sbatch", "jobs/configs/demo.toml",
                       "--set", "downpour.steps=1000", "--set", "data.path=data/shards",
                       # a slowed replica: the job is still running when the requeue lands
                       "--set", "downpour.straggler_replica=0",
                       "--set", "downpour.straggler_factor=3.0",
                       "--set", "checkpoint.every_steps=100",
                       env={"DBMPI_LAUNCHER": "srun"})
    run_dir = slurm.project / "runs" / f"train-{job}"
    slurm.wait_for(job, lambda: list((run_dir / "checkpoints").glob("ckpt-????????")),
                   f"a checkpoint in {run_dir}", run_dir)
    r = slurm.run("scontrol", "requeue", job)
    assert r.returncode == 0, r.stderr
    rec = slurm.wait(job, run_dir)
    log = slurm.log("train", job)
    assert (rec["state"], rec["exit_code"]) == ("COMPLETED", "0:0"), f"{rec}\n{log}"
    assert "restart 1 of job" in log and "resuming from" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2000 and summary["resumed_from"]["steps"] > 0


def test_shard_job_one_task_per_rank(slurm):
    job = slurm.submit("jobs/shard.sbatch", "data/sharded", "--src", "data/idx", "--shards", "8")
    rec = slurm.wait(job)
    log = slurm.log("shard", job)
    assert (rec["state"], rec["exit_code"]) == ("COMPLETED", "0:0"), f"{rec}\n{log}"
    for task in range(4):  # srun -l: each of the 4 tasks wrote its shards
        assert f"{task}: [data_tools] task {task}/4 done" in log, log
    out = slurm.project / "data" / "sharded"
    assert len(list(out.glob("train-*-of-00008.h5"))) == 8
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert [f["num_examples"] for f in splits["train"]] == [250] * 8
    assert [f["num_examples"] for f in splits["test"]] == [400]
    check = slurm.run(sys.executable, "-m", "data_tools", "check", str(out), "--verify",
                      env={"PYTHONPATH": str(ROOT)})
    assert check.returncode == 0, check.stdout + check.stderr


def _mpich_shm(job: str) -> list[Path]:
    """Shared memory MPICH made for step JOB.0 under srun (named by FNV-1a of PMI_JOBID)."""
    h = 2166136261
    for byte in f"{job}.0".encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return sorted(Path("/dev/shm").glob(f"mpich_*_{h:x}_*"))


# An error on the ranks must fail the job through srun and through mpiexec.
@pytest.mark.parametrize("launcher, ntasks, args, message", [
    ("srun", "5", ["--set", "model.nope=1"], "unknown key 'model.nope'"),
    ("mpiexec", "5", ["--set", "model.nope=1"], "unknown key 'model.nope'"),
    ("srun", "4", [], "the config needs 5 MPI ranks"),
])
def test_failing_job_is_recorded_failed(slurm, launcher, ntasks, args, message):
    job = slurm.submit("-n", ntasks, "jobs/train.sbatch", "jobs/configs/demo.toml",
                       "--set", "data.path=data/shards", *args, env={"DBMPI_LAUNCHER": launcher})
    rec = slurm.wait(job)
    log = slurm.log("train", job)
    assert rec["state"] == "FAILED" and rec["exit_code"] != "0:0", f"{rec}\n{log}"
    assert "dbmpi: error:" in log and message in log, log
    assert "final test accuracy" not in log
    # The aborted ranks' shared memory is gone (jobs/slurm/epilog.sh).
    assert not _mpich_shm(job), f"left in /dev/shm: {_mpich_shm(job)}"


# jobs/local.sh needs no SLURM: it runs wherever mpiexec does.
def test_local_launcher(small_data, tmp_path):
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    common = ["jobs/configs/demo.toml", "--set", f"data.path={small_data}"]
    r = run_command(["jobs/local.sh", *common, "--set", "downpour.steps=50",
                     "--set", "run.dir=runs/local"], env, tmp_path, tmp_path / "runs/local",
                    watch=(tmp_path / "logs" / "*.out",))
    assert r.returncode == 0, r.stdout + r.stderr
    logs = list((tmp_path / "logs").glob("demo-local-*.out"))
    assert len(logs) == 1 and "final test accuracy" in logs[0].read_text(), r.stdout
    assert json.loads((tmp_path / "runs/local/summary.json").read_text())["steps"] == 100
    bad = run_command(["jobs/local.sh", *common, "--set", "model.nope=1"], env, tmp_path,
                      watch=(tmp_path / "logs" / "*.out",))
    assert bad.returncode == 2 and "unknown key 'model.nope'" in bad.stdout, bad.stdout
