"""Shared fixtures: a small data set made by the project itself, and a job runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec") if (
    Path(sys.executable).parent / "mpiexec").exists() else "mpiexec"

# Ranks outnumber cores in these tests: MPICH must yield while waiting (see README).
JOB_ENV = {
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


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
    """Write a job config: ``{"topology": {"shards": 2, ...}, ...}`` as TOML at ``path``."""
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                                    for k, v in keys.items())
                            for name, keys in sections.items()))
    return path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors dbmpi printed (``dbmpi: error...``) in a job's stderr."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("dbmpi: error")]


def run_job(nranks: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``mpiexec -n N python -m mpi4py -m dbmpi ARGS`` under a timeout; never hangs a test."""
    full_env = {**os.environ, **JOB_ENV, **(env or {})}
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd)
    if proc.returncode != 0:
        remove_stale_mpich_segments()
    return proc
