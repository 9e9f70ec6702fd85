"""``python -m tests.netbed``: bring beds of namespace hosts up and down, run MPI jobs on them.

See tests/netbed.py for what a bed is. `mpiexec` and `suite` use the bed named by --bed or
$DBMPI_NETBED, or else make one of --hosts hosts for the job and remove it afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tests.netbed import (
    MAX_HOSTS,
    ROOT,
    TRANSPORTS,
    YIELD_ENV,
    Bed,
    NetbedError,
    beds,
    find,
    stale,
    unavailable,
)

EPILOG = ("Links can be rate-shaped (tc tbf) but not delayed: this kernel has no netem qdisc, "
          "so latency stays that of veth. Needs root.")


def _job_args(p: argparse.ArgumentParser, default_np: int | None) -> None:
    p.add_argument("--bed", help="an existing bed's id (default: $DBMPI_NETBED, else a new one)")
    p.add_argument("--hosts", type=int, default=2, help="hosts of a new bed (default 2)")
    p.add_argument("--rate", default="none", help="new bed's link rate: 10gbit, 1gbit, none")
    p.add_argument("-n", "--np", type=int, default=default_np, required=default_np is None,
                   help="MPI ranks")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ppn", type=int, help="ranks per host, filling host 0 first")
    where.add_argument("--map", help="host of each rank, e.g. 0,0,1,2 (default: even blocks)")
    p.add_argument("--transport", choices=sorted(TRANSPORTS), default="ucx",
                   help="between hosts: ucx (UCX_TLS=tcp,self) or ofi (libfabric tcp)")
    p.add_argument("--intra", choices=("shm", "tcp"), default="shm",
                   help="ranks of one host: MPICH shared memory (default) or TCP "
                        "(MPIR_CVAR_NOLOCAL=1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tests.netbed", description=__doc__.split("\n")[0],
                                 epilog=EPILOG)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a bed; prints `export DBMPI_NETBED=ID`", epilog=EPILOG)
    up.add_argument("--hosts", type=int, required=True, help=f"1..{MAX_HOSTS}")
    up.add_argument("--rate", default="none", help="tbf rate of every link: 10gbit, 1gbit, none")
    up.add_argument("--name", default="bed", help="lower-case letters/digits (default bed)")
    up.add_argument("--owner", type=int, default=os.getppid(),
                    help="pid the bed belongs to; it is stale once that dies (default: the "
                         "calling shell)")
    down = sub.add_parser("down", help="remove a bed and the processes inside it")
    down.add_argument("bed", nargs="?", help="its id (default $DBMPI_NETBED or the only one)")
    down.add_argument("--stale", action="store_true", help="remove every bed whose owner died")
    sub.add_parser("list", help="beds on this machine")
    sub.add_parser("check", help="exit 0 if beds can be made here, else say why and exit 1")
    ex = sub.add_parser("exec", help="run CMD inside host HOST (a number) of a bed")
    ex.add_argument("--bed")
    ex.add_argument("host", type=int)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    mp = sub.add_parser("mpiexec", help="an MPI job across the bed's hosts: -- CMD...",
                        epilog=EPILOG)
    _job_args(mp, None)
    mp.add_argument("argv", nargs=argparse.REMAINDER)
    su = sub.add_parser("suite", help="tests/mpi under mpiexec across hosts: [-- pytest args]")
    _job_args(su, 4)
    su.add_argument("argv", nargs=argparse.REMAINDER)
    return ap


def _strip(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def _run_job(a: argparse.Namespace, cmd: list[str]) -> int:
    rank_hosts = [int(h) for h in a.map.split(",")] if a.map else None
    env = {**YIELD_ENV, **os.environ}  # the caller's settings win over the yield defaults
    if a.bed or os.environ.get("DBMPI_NETBED"):
        bed, made = find(a.bed), False
    else:
        bed, made = Bed(a.hosts, name="job", rate=a.rate).up(), True
    try:
        argv = bed.mpiexec_cmd(a.np, cmd, ppn=a.ppn, rank_hosts=rank_hosts,
                               transport=a.transport, intra=a.intra)
        hosts = bed.placement(a.np, a.ppn, rank_hosts)
        print(f"netbed: {a.np} ranks on bed {bed.id}, rank hosts {hosts}, {a.transport} "
              f"between hosts, {a.intra} within", file=sys.stderr, flush=True)
        try:
            return bed.run(argv, timeout=a.timeout, env=env, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            print(f"netbed: the job ran past {a.timeout:.0f} s and was killed", file=sys.stderr)
            return 124
    finally:
        if made:
            bed.down()


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "check":
        why = unavailable()
        print(why or "network namespaces usable")
        return 1 if why else 0
    try:
        if a.cmd != "list" and (why := unavailable()):
            raise NetbedError(why)
        if a.cmd == "up":
            bed = Bed(a.hosts, name=a.name, rate=a.rate, owner=a.owner).up()
            print(f"netbed: bed {bed.id} up: hosts {', '.join(bed.addr(h) for h in range(a.hosts))}"
                  f" on {bed.id}-h0.. (rate {bed.rate or 'veth'})", file=sys.stderr)
            print(f"export DBMPI_NETBED={bed.id}")
        elif a.cmd == "down":
            todo = stale() if a.stale else [find(a.bed)]
            for bed in todo:
                print(f"netbed: removed {bed.id}: {', '.join(bed.down()) or 'nothing left'}",
                      file=sys.stderr)
        elif a.cmd == "list":
            dead = {b.id for b in stale()}
            for bid, bed in beds().items():
                print(f"{bid}\t{bed.hosts} hosts\towner {bed.owner}"
                      f"{' (dead: stale)' if bid in dead else ''}")
        elif a.cmd == "exec":
            cmd = _strip(a.argv)
            if not cmd:
                raise NetbedError("exec needs a command: exec HOST CMD...")
            bed = find(a.bed)
            env = {**os.environ, "DBMPI_NETBED": bed.id}
            return subprocess.run(bed.exec_cmd(a.host, cmd), check=False, env=env).returncode
        elif a.cmd == "mpiexec":
            if not _strip(a.argv):
                raise NetbedError("mpiexec needs a command after --")
            return _run_job(a, _strip(a.argv))
        elif a.cmd == "suite":
            args = _strip(a.argv) or ["tests/mpi"]
            return _run_job(a, [sys.executable, "-m", "mpi4py", "-m", "pytest", "-x",
                                "-p", "no:cacheprovider", *args])
    except NetbedError as e:
        print(f"netbed: error: {e}", file=sys.stderr)
        return 2
    return 0
