"""``python -m dbmpi launch CONFIG``: start ``train`` under mpiexec with the right rank count.

It reads the config to compute N = 1 + shards + replicas x partitions, and, when N exceeds the
cores it may use, tells MPICH to yield the CPU while a rank waits (measured here: without these
settings every waiting rank burns a full core), and gives each rank one BLAS thread. Settings
already in the environment win.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from . import config as config_mod

# MPICH CVARs that make ranks blocked in MPI yield their core (harmless for other MPIs).
MPICH_YIELD = {
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def launch_env(nranks: int, compute_ranks: int, env: dict | None = None) -> dict:
    """The environment for an N-rank job on this machine."""
    env = dict(os.environ if env is None else env)
    cores = available_cores()
    if nranks > cores:
        for key, value in MPICH_YIELD.items():
            env.setdefault(key, value)
    # One core is left to the coordinator and the shards (they wake often; a BLAS thread
    # they preempt stalls its whole GEMM: measured 3.5x slower with 2 threads on 2 cores).
    spare = 1 if nranks > compute_ranks else 0
    threads = str(max(1, (cores - spare) // max(1, compute_ranks)))
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def find_mpiexec() -> str:
    """mpiexec beside this Python (a virtualenv with the mpich wheel) or on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise SystemExit("dbmpi: error: no mpiexec found: install an MPI (e.g. "
                         "`pip install 'dbmpi[mpich]'`) or load your site's MPI module")
    return found


def command(config_path: str, overrides: list[str], nranks: int, mpiexec: str) -> list[str]:
    cmd = [mpiexec, "-n", str(nranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
           config_path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def main(config_path: str, overrides: list[str], dry_run: bool = False) -> int:
    cfg = config_mod.load(config_path, overrides)
    n = cfg.topology.world_size
    env = launch_env(n, cfg.topology.replicas * cfg.topology.partitions)
    cmd = command(config_path, overrides, n, find_mpiexec())
    print("dbmpi launch: " + " ".join(cmd), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


def print_env(shell: bool = False) -> None:
    """The MPICH yield variables, one ``KEY=VALUE`` a line (the Makefile and the tests take
    them from here); ``--shell``: ``export KEY="${KEY:-VALUE}"`` lines for job scripts to
    eval, so that a value already in the environment wins."""
    for key, value in MPICH_YIELD.items():
        print(f'export {key}="${{{key}:-{value}}}"' if shell else f"{key}={value}")


if __name__ == "__main__":  # python -m dbmpi.launch --print-env [--shell]
    if sys.argv[1:2] != ["--print-env"] or sys.argv[2:] not in ([], ["--shell"]):
        raise SystemExit("usage: python -m dbmpi.launch --print-env [--shell]")
    print_env(shell=sys.argv[2:] == ["--shell"])
