"""``python -m dbmpi launch CONFIG``: start ``train`` under mpiexec with the right rank count.

It reads the config to compute N = 1 + shards + replicas x partitions, and, when N exceeds the
cores it may use, tells MPICH to yield the CPU while a rank waits (measured here: without these
settings every waiting rank burns a full core), and gives each rank one BLAS thread. Settings
already in the environment win.

With ``--hosts a:8,b:8`` (or ``--hostfile``, or inside a SLURM job) it also chooses each rank's
host (:mod:`dbmpi.placement`, docs/placement.md) and hands mpiexec that order.

Downpour with ``downpour.replica_loss = "continue"`` (the default) under MPICH's hydra runs
with ``-disable-auto-cleanup`` and each rank under :data:`KEEP_GOING`, so that a dead replica
does not end the job (:mod:`dbmpi.train.downpour.census`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import config as config_mod
from . import envcheck, placement

# MPICH CVARs that make ranks blocked in MPI yield their core (harmless for other MPIs).
MPICH_YIELD = {
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
}


# Each rank runs under `sh -c KEEP_GOING sh CMD...`. Measured on hydra 5.0.2 with
# -disable-auto-cleanup: when a rank dies *by a signal*, its proxy still SIGKILLs the others
# in about half the runs; when it exits with a status, never. So sh waits for its rank and
# exits with a status: 0 for a rank killed by a signal (the job's census decides what that
# death means), the status otherwise (129, 130, 143: a rank stopped by SIGHUP, SIGINT, SIGTERM
# keeps its status). sh ignores SIGUSR1, hydra's death notice, which is for the rank.
KEEP_GOING = ('trap "" USR1; "$@"; s=$?; case $s in 129|130|143) exit $s;; esac; '
              '[ $s -gt 128 ] && exit 0; exit $s')


def is_hydra(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is MPICH's hydra (which has ``-disable-auto-cleanup``)."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "HYDRA" in out


def keep_going(cmd: list[str]) -> list[str]:
    """``mpiexec -disable-auto-cleanup ARGS sh -c KEEP_GOING sh PYTHON...`` from ``cmd``,
    ``[mpiexec, ARGS..., PYTHON...]`` (PYTHON: this interpreter, as :func:`command` puts it)."""
    i = cmd.index(sys.executable)
    return [cmd[0], "-disable-auto-cleanup", *cmd[1:i], "sh", "-c", KEEP_GOING, "sh", *cmd[i:]]


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
    """mpiexec beside this Python (a virtualenv with the mpich wheel) or on PATH.

    Without one, the project's .venv (made by `make`) may hold one: then this is the wrong
    Python (its ranks would lack the MPI that mpiexec speaks), and the error says to use the
    environment instead of installing an MPI."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found:
        return found
    for venv in envcheck.project_venvs():
        if (venv / "bin" / "mpiexec").exists():
            envcheck.fail(f"dbmpi: error: no mpiexec beside this Python ({sys.executable}) "
                          f"or on PATH, but the project's environment has one: "
                          f"{envcheck.use_venv_hint(venv, 'dbmpi launch')}")
    envcheck.fail("dbmpi: error: no mpiexec found: install an MPI (e.g. "
                  "`pip install 'dbmpi[mpich]'`) or load your site's MPI module")


def command(config_path: str, overrides: list[str], nranks: int, mpiexec: str) -> list[str]:
    cmd = [mpiexec, "-n", str(nranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
           config_path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def host_list(hosts: str | None, hostfile: str | None, env: dict) -> list | None:
    """The hosts to place ranks on: --hosts, --hostfile, else SLURM's allocation inside a job,
    else None (every rank where mpiexec puts it, as without placement)."""
    if hosts and hostfile:
        raise placement.PlacementError("--hosts and --hostfile: give one of them")
    if hosts:
        return placement.parse_hosts(hosts)
    if hostfile:
        return placement.read_hostfile(hostfile)
    if env.get("SLURM_JOB_ID"):
        return placement.slurm_hosts(env)
    return None


def placed_command(cmd: list[str], places: list) -> list[str]:
    """``mpiexec -hosts a:3,b:2,a:2 -n N ...``: MPICH hydra fills these entries in order.

    Per-section ``-hosts`` in an MPMD line (``-n 1 -hosts a cmd : -n 2 -hosts b cmd``) is
    refused by hydra 5.0 ("duplicate host file or host list setting"); one ordered list is not.
    """
    return [cmd[0], "-hosts", placement.hydra_hosts(places), *cmd[1:]]


def plan_job(cfg, hosts: str | None = None, hostfile: str | None = None,
             ps_hosts: str | None = None, oversubscribe: bool = False,
             env: dict | None = None) -> list | None:
    """The rank -> host plan for this config, or None without hosts to place on."""
    env = dict(os.environ if env is None else env)
    host_objs = host_list(hosts, hostfile, env)
    if host_objs is None:
        if ps_hosts:
            raise placement.PlacementError("--ps-hosts needs the hosts too: add --hosts "
                                           "a:N,b:N or --hostfile FILE")
        return None
    ps = [x.strip() for x in ps_hosts.split(",") if x.strip()] if ps_hosts else None
    t = cfg.topology
    return placement.plan(t.shards, t.replicas, t.partitions, host_objs, ps, oversubscribe)


def main(config_path: str, overrides: list[str], dry_run: bool = False,
         hosts: str | None = None, hostfile: str | None = None, ps_hosts: str | None = None,
         oversubscribe: bool = False, rankfile: str | None = None,
         verbose: bool = False) -> int:
    cfg = config_mod.load(config_path, overrides)
    n = cfg.topology.world_size
    env = launch_env(n, cfg.topology.replicas * cfg.topology.partitions)
    places = plan_job(cfg, hosts, hostfile, ps_hosts, oversubscribe)
    mpiexec = find_mpiexec()
    cmd = command(config_path, overrides, n, mpiexec)
    if places is not None:
        cmd = placed_command(cmd, places)
        if dry_run:
            print(placement.table(places), flush=True)
        if rankfile:
            Path(rankfile).write_text(placement.rankfile(places))
            print(f"dbmpi launch: wrote the Open MPI rankfile {rankfile}: mpirun -np {n} "
                  f"--rankfile {rankfile} {' '.join(command(config_path, overrides, n, '')[3:])}",
                  file=sys.stderr, flush=True)
    elif rankfile:
        raise placement.PlacementError("--rankfile needs the hosts: add --hosts or --hostfile")
    if cfg.algorithm == "downpour" and cfg.downpour.replica_loss == "continue" and \
            is_hydra(mpiexec):
        cmd = keep_going(cmd)
    print("dbmpi launch: " + shlex.join(cmd), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    # rank 0's stderr is mpiexec's pipe, never the terminal: say here whether there is one,
    # so that only a terminal gets the in-place progress line (dbmpi.progress)
    env.setdefault("DBMPI_PROGRESS", "tty" if sys.stderr.isatty() else "plain")
    from .supervise import supervise

    return supervise(cmd, env, cfg.run.dir, verbose)


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
