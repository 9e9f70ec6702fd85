"""Shared fixtures: a small data set made by the project itself, and job runners that wait
on a job's progress instead of a wall-clock budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dbmpi import config as config_mod
from dbmpi.errors import DbmpiError
from dbmpi.faults import rank_pids
from dbmpi.launch import MPICH_YIELD

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec") if (
    Path(sys.executable).parent / "mpiexec").exists() else "mpiexec"

# Ranks outnumber cores in these tests: MPICH must yield while waiting (see README). The
# variables come from dbmpi.launch, their one source (the Makefile and jobs/site.sh too).
JOB_ENV = {**MPICH_YIELD, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# A job test waits on the job's progress, not on a wall-clock budget: it fails when the job
# has written nothing (its log, its run directory's metrics/rank-*.jsonl) for STALL_S seconds,
# and, as the last guard, after CAP_S seconds in all. On a loaded machine a healthy job is
# slow but keeps writing; a hung one stops. A job that hangs while logging the same warning
# every few seconds keeps "writing", so the cap is what ends it: 600 s, 10x the longest job
# test (the SLURM requeue, 60 s), so that a hang fails its test in 10 minutes (one once held
# CI for 20). DBMPI_TEST_STALL_S / DBMPI_TEST_CAP_S override.
STALL_S = float(os.environ.get("DBMPI_TEST_STALL_S", "90"))
CAP_S = float(os.environ.get("DBMPI_TEST_CAP_S", "600"))


class JobStalled(AssertionError):
    """A job stopped advancing (or ran past the absolute cap)."""


def file_sizes(patterns: list[Path | str]) -> tuple:
    """Sizes of every file matching ``patterns`` (paths or globs): grows while a job runs."""
    out = []
    for pattern in patterns:
        p = Path(pattern)
        for f in sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]:
            try:
                out.append((str(f), f.stat().st_size))
            except OSError:
                pass
    return tuple(out)


def wait_while_advancing(until, progress, what: str, stall_s: float | None = None,
                         cap_s: float | None = None, describe=lambda: "", poll_s: float = 0.1):
    """Poll ``until()`` until it returns something truthy (returned); JobStalled when
    ``progress()`` (any comparable snapshot: file sizes, a job state) has not changed for
    ``stall_s`` seconds or ``cap_s`` seconds have passed. ``describe()`` adds the job's log
    to the failure."""
    stall_s = STALL_S if stall_s is None else stall_s
    cap_s = CAP_S if cap_s is None else cap_s
    start = last_change = time.monotonic()
    seen = progress()
    while True:
        result = until()
        if result:
            return result
        now = time.monotonic()
        snapshot = progress()
        if snapshot != seen:
            seen, last_change = snapshot, now
        elif now - last_change > stall_s:
            raise JobStalled(f"{what}: no progress for {stall_s:g} s (its log, metrics and "
                             f"state did not change)\n{describe()}")
        if now - start > cap_s:
            raise JobStalled(f"{what}: still running after the {cap_s:g} s cap\n{describe()}")
        time.sleep(poll_s)


def job_run_dir(args: list[str], cwd: Path) -> Path | None:
    """The run directory of ``train CONFIG [--set ...]`` (None when the config is bad or
    picks a timestamped one): where the job's metrics/rank-*.jsonl grow."""
    if len(args) < 2 or args[0] != "train":
        return None
    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    try:
        cfg = config_mod.load(Path(cwd) / args[1], overrides)
    except DbmpiError:
        return None
    return Path(cwd) / cfg.run.dir if cfg.run.dir else None


class Job:
    """A command started in the background (a job: mpiexec, a job script, a dbmpi command),
    its stdout and stderr in files so that their growth shows progress, as does that of the
    files matching ``watch`` (paths or globs) and of ``run_dir``'s metrics/rank-*.jsonl. Use
    as a context manager: a job still running at the end is killed with its process group."""

    def __init__(self, cmd: list, env: dict | None = None, cwd: Path = ROOT,
                 run_dir: Path | None = None, watch: tuple = (), stall_s: float | None = None,
                 cap_s: float | None = None):
        """``env``: the whole environment (default: this process's)."""
        self.stall_s, self.cap_s = stall_s, cap_s
        self.cmd = [str(c) for c in cmd]
        self.run_dir = run_dir
        self.watch = [*watch, *([Path(run_dir) / "metrics" / "rank-*.jsonl"] if run_dir else [])]
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=os.environ if env is None else env,
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, start_new_session=True)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def progress(self) -> tuple:
        sizes = (os.fstat(self._out.fileno()).st_size, os.fstat(self._err.fileno()).st_size)
        return sizes + file_sizes(self.watch)

    def _read(self, fh) -> str:
        fh.seek(0)
        return fh.read().decode("utf-8", errors="replace")

    @property
    def stdout(self) -> str:
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        return self._read(self._err)

    def describe(self) -> str:
        return f"$ {' '.join(self.cmd)}\n--- stderr (tail)\n{self.stderr[-3000:]}"

    def wait_for(self, pred, what: str):
        """Wait until ``pred()`` holds while the job advances; fail at once if the job ended
        without it."""
        def until():
            got = pred()
            if not got and self.proc.poll() is not None:
                got = pred()  # it may have come true as the job ended
                if not got:
                    raise AssertionError(f"the job ended (exit {self.proc.returncode}) before "
                                         f"{what}\n{self.describe()}")
            return got
        return wait_while_advancing(until, self.progress, f"waiting for {what}", self.stall_s,
                                    self.cap_s, describe=self.describe)

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for the job to end while it advances (killed and JobStalled otherwise)."""
        try:
            wait_while_advancing(lambda: self.proc.poll() is not None, self.progress,
                                 f"job {' '.join(self.cmd[-4:])}", self.stall_s, self.cap_s,
                                 describe=self.describe)
        except JobStalled:
            self.kill()
            raise
        if self.proc.returncode != 0:
            remove_stale_mpich_segments()
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.stdout,
                                           self.stderr)

    def kill(self) -> None:
        """SIGKILL the job's process group (mpiexec and its ranks)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            remove_stale_mpich_segments()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._out.close()
        self._err.close()


def start_job(nranks: int, args: list, env: dict | None = None, cwd: Path = ROOT,
              run_dir: Path | None = None) -> Job:
    """``mpiexec -n N python -m mpi4py -m dbmpi ARGS`` in the background (see Job)."""
    _require_job_marker()
    args = [str(a) for a in args]
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", *args]
    return Job(cmd, {**os.environ, **JOB_ENV, **(env or {})}, cwd,
               run_dir or job_run_dir(args, cwd))


def run_job(nranks: int, args: list, env: dict | None = None, cwd: Path = ROOT,
            run_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n N python -m mpi4py -m dbmpi ARGS`` to its end; fails the test (the
    job killed) when the job stops advancing, so it never hangs a test."""
    with start_job(nranks, args, env, cwd, run_dir) as job:
        return job.wait()


def run_command(cmd: list, env: dict | None = None, cwd: Path = ROOT,
                run_dir: Path | None = None, watch: tuple = ()) -> subprocess.CompletedProcess:
    """Run any job-like command (a job script, ``python -m dbmpi probe``) to its end, on the
    same progress rule as run_job; ``env`` is the whole environment (default: ours)."""
    _require_job_marker()
    with Job(cmd, env, cwd, run_dir, watch) as job:
        return job.wait()


# -- the `job` marker: `make check` (-m "not job") runs no job; a test that starts one
# unmarked fails at once instead of slipping into the quick suite.
_current_marked_job = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _current_marked_job
    _current_marked_job = item.get_closest_marker("job") is not None


def _require_job_marker() -> None:
    if not _current_marked_job:
        test = os.environ.get("PYTEST_CURRENT_TEST", "this test").split(" ")[0]
        raise AssertionError(f"{test} starts a job: mark it @pytest.mark.job")


def remove_stale_mpich_segments() -> int:
    """Delete MPICH shared-memory segments that no live process maps.

    An aborted MPICH job (these tests abort jobs on purpose) leaves /dev/shm/mpich_shm_*
    behind; a later job whose id hashes to the same name can then fail or hang in MPI_Init.
    """
    shm = Path("/dev/shm")
    stale = set(shm.glob("mpich_shm_*")) if shm.is_dir() else set()
    if not stale:
        return 0
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        if "mpich_shm_" in text:
            stale = {p for p in stale if str(p) not in text}
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory():
    remove_stale_mpich_segments()
    yield
    remove_stale_mpich_segments()


def make_synth_shards(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """Synthetic 28x28 10-class data made here, in 4 train shards and 1 test shard."""
    from data_tools.synth import write_synth

    write_synth(root / "idx", n_train=n_train, n_test=n_test, seed=seed)
    subprocess.run([sys.executable, "-m", "data_tools", "shard", "idx", "--src", str(root / "idx"),
                    "--out", str(root / "shards"), "--shards", "4"], check=True, cwd=ROOT,
                   capture_output=True)
    return root / "shards"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """2400 train examples in 4 shards, 400 test."""
    return make_synth_shards(tmp_path_factory.mktemp("data"), 2400, 400, seed=1)


def _toml_value(v) -> str:
    if isinstance(v, dict):  # an inline table (a layer)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v) if isinstance(v, Path) else v)  # JSON scalars are TOML scalars


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    """Write a job config: ``{"topology": {"shards": 2, ...}, ...}`` as TOML at ``path``.
    A ``run`` section gets ``learning_curve = false`` unless it says otherwise: drawing the
    curve is 1.5 s of every job's end, and the tests that look at it ask for it."""
    if "run" in sections:
        sections = {**sections, "run": {"learning_curve": False, **sections["run"]}}
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                                    for k, v in keys.items())
                            for name, keys in sections.items()))
    return path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors dbmpi printed (``dbmpi: error...``) in a job's stderr."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("dbmpi: error")]


def kill_after_checkpoints(nranks: int, cfg: Path, run: Path, rank: int,
                           count: int = 1) -> subprocess.CompletedProcess:
    """Start the job of ``cfg``, SIGKILL world rank ``rank`` once ``run`` holds ``count``
    committed checkpoints, and return the ended job (its status is non-zero)."""
    from dbmpi import checkpoint as ckpt_mod

    def committed() -> int:
        return len(list(ckpt_mod.checkpoint_root(run).glob("ckpt-????????")))

    with start_job(nranks, ["train", str(cfg)]) as job:
        job.wait_for(lambda: committed() >= count, f"{count} checkpoint(s)")
        os.kill(rank_pids(cfg)[rank], signal.SIGKILL)
        return job.wait()


def require_netns(what: str) -> None:
    """Skip (with the reason) where network namespaces cannot be made; under
    ``DBMPI_REQUIRE_NETNS=1`` (CI) fail instead."""
    from tests import netbed

    why = netbed.unavailable()
    if why and os.environ.get("DBMPI_REQUIRE_NETNS") == "1":
        pytest.fail(f"DBMPI_REQUIRE_NETNS=1 but {why}", pytrace=False)
    if why:
        pytest.skip(f"{what} not run: {why}")
