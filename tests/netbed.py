"""Several "hosts" on one machine from Linux network namespaces, for MPI jobs over TCP.

A bed is a bridge in its own namespace and one namespace per host, joined to the bridge by a
veth pair. Host K has address 10.213.0.(K+1)/24 on interface ``nb0`` inside its namespace
(nothing is configured in the root namespace) and its own hostname (a UTS namespace per
command). Links may be rate-shaped with ``tc tbf``; this kernel has no ``netem``, so no delay
can be added: latency stays that of veth (~10-50 us here). Needs root and ``ip``/``unshare``.

    python -m tests.netbed up --hosts 3 [--rate 1gbit]     # prints export DBMPI_NETBED=ID
    python -m tests.netbed exec 1 hostname                 # host 1 of $DBMPI_NETBED
    python -m tests.netbed mpiexec --hosts 3 -n 4 -- python -m mpi4py script.py
    python -m tests.netbed suite --hosts 3 -n 4 -- tests/mpi/test_rma.py
    python -m tests.netbed down [ID] | down --stale

MPI jobs use MPICH hydra: mpiexec runs in host 0, ``-launcher rsh -launcher-exec
tests/netbed-exec`` starts one proxy per host entry in that host's namespace. Ranks of one
host share memory (MPICH shm, as on a real node) unless ``intra="tcp"`` (MPIR_CVAR_NOLOCAL=1:
every pair over TCP, and COMM_TYPE_SHARED groups become single ranks); ranks of different
hosts always talk TCP (``UCX_TLS=tcp,self``: otherwise UCX uses shared memory and CMA across
namespaces), or libfabric's tcp provider with ``transport="ofi"``.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
EXEC = ROOT / "tests" / "netbed-exec"
PREFIX = "dbnb"              # every namespace of every bed: dbnb-<owner pid>-<name>-{br,hK}
SUBNET = "10.213.0"          # private, configured inside the bed's namespaces only
IFACE = "nb0"                # a host's end of its link (the -iface of hydra)
MAX_HOSTS = 32
CMD_TIMEOUT = 30             # s, for each ip/tc call
NS_RE = re.compile(rf"^{PREFIX}-(\d+)-([a-z0-9]+)-(br|h\d+)$")
TRANSPORTS = {  # what makes MPICH (the PyPI wheel: ch4 with ucx and ofi) take the network
    "ucx": {"UCX_TLS": "tcp,self"},
    "ofi": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
}
# Ranks outnumber cores in tests: MPICH ranks waiting in MPI must yield (see tests/conftest.py).
YIELD_ENV = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1", "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
             "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
             "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
             "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class NetbedError(RuntimeError):
    """A bed could not be made, used or removed; the message is one line."""


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetbedError(f"`{shlex.join(argv)}` failed: {e}") from None
    if check and r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise NetbedError(f"`{shlex.join(argv)}` failed: {why}")
    return r


def unavailable() -> str | None:
    """Why beds cannot be made here (one line), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root and this is not root"
    for prog in ("ip", "tc", "unshare"):
        if not shutil.which(prog):
            return f"`{prog}` is missing (Debian: apt-get install iproute2 util-linux)"
    probe = f"{PREFIX}-{os.getpid()}-probe-br"
    r = _run(["ip", "netns", "add", probe], check=False)
    _run(["ip", "netns", "del", probe], check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    return None


def rate_burst(rate: str) -> str:
    """tbf's bucket for RATE ("10gbit", "500mbit"): 2 ms at that rate, at least 64 KiB.

    A smaller bucket than one veth GSO super-packet (64 KiB) makes tbf drop or split them.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", rate)
    if not m:
        raise NetbedError(f"rate {rate!r} is not like 10gbit, 1gbit, 200mbit or none")
    bits = float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return f"{max(64 * 1024, int(bits / 8 * 0.002))}b"


_LIVE: dict[str, Bed] = {}  # beds this process brought up: removed at exit or on a signal


def _down_live(*_):
    for bed in list(_LIVE.values()):
        bed.down()


def _on_signal(signum, frame):
    _down_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _guard():
    """Once per process: remove our beds at exit and on SIGTERM/SIGHUP (SIGINT too where
    nothing else handles it), then die of that signal as asked."""
    if getattr(_guard, "done", False):
        return
    _guard.done = True
    atexit.register(_down_live)
    # SIGINT's usual handler raises KeyboardInterrupt, which `with` and atexit already handle.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            try:
                signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread: the context manager still cleans up
                pass


@dataclass
class Bed:
    """HOSTS namespaces on a bridge. ``with Bed(3) as bed:`` brings it up and removes it."""

    hosts: int
    name: str = "bed"
    rate: str | None = None          # tbf on both ends of every link; None: veth speed
    owner: int = field(default_factory=os.getpid)  # a bed whose owner died is stale

    def __post_init__(self):
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise NetbedError(f"--hosts must be 1..{MAX_HOSTS}, not {self.hosts}")
        if not re.fullmatch(r"[a-z0-9]{1,12}", self.name):
            raise NetbedError(f"bed name {self.name!r}: use 1-12 lower-case letters or digits")
        if self.rate in ("none", ""):
            self.rate = None
        if self.rate:
            rate_burst(self.rate)

    @property
    def id(self) -> str:
        return f"{PREFIX}-{self.owner}-{self.name}"

    def ns(self, host: int) -> str:
        return f"{self.id}-h{host}"

    def addr(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in range(self.hosts)] + [f"{self.id}-br"]

    # -- making and removing ----------------------------------------------------------------
    def up(self) -> Self:
        if self.id in _LIVE or any(ns in _netns() for ns in self.namespaces):
            raise NetbedError(f"bed {self.id} exists already: remove it with `down {self.id}`")
        if self.owner == os.getpid():  # a bed made for another process (CLI `up`) outlives us
            _guard()
            _LIVE[self.id] = self
        br = f"{self.id}-br"
        try:
            _run(["ip", "netns", "add", br])
            _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", br, "link", "set", "br0", "up"])
            for h in range(self.hosts):
                ns = self.ns(h)
                _run(["ip", "netns", "add", ns])
                # Both ends are made in bed namespaces: the root namespace never sees them.
                _run(["ip", "-n", br, "link", "add", f"h{h}", "type", "veth",
                      "peer", "name", IFACE, "netns", ns])
                _run(["ip", "-n", br, "link", "set", f"h{h}", "master", "br0", "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", IFACE])
                _run(["ip", "-n", ns, "link", "set", IFACE, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.rate:
                self.shape(self.rate)
        except BaseException:
            self.down()
            raise
        return self

    def shape(self, rate: str | None) -> None:
        """Limit every link to RATE in both directions (tc tbf), or unshape it (None/"none")."""
        rate = None if rate in (None, "", "none") else rate
        burst = rate_burst(rate) if rate else ""
        for h in range(self.hosts):  # each end of a link shapes what it sends
            for ns, dev in ((self.ns(h), IFACE), (f"{self.id}-br", f"h{h}")):
                if rate:
                    _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                          "rate", rate, "burst", burst, "latency", "50ms"])
                else:  # fails harmlessly where there was no tbf
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
        self.rate = rate

    def kill_all(self, grace: float = 3.0) -> int:
        """SIGTERM, then after GRACE s SIGKILL, every process inside the bed; their count."""
        pids: set[int] = set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            now = self.pids()
            pids |= now
            for pid in now:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.pids():
                break
        return len(pids)

    def pids(self) -> set[int]:
        live = _netns()
        out = set()
        for ns in self.namespaces:
            if ns in live:
                out |= {int(p) for p in _run(["ip", "netns", "pids", ns], check=False)
                        .stdout.split() if int(p) != os.getpid() and not _zombie(int(p))}
        return out

    def down(self) -> list[str]:
        """Stop the bed's processes and delete its namespaces (links go with them)."""
        self.kill_all()
        live = _netns()
        gone = [ns for ns in self.namespaces if ns in live]
        for ns in gone:
            _run(["ip", "netns", "del", ns], check=False)
        _LIVE.pop(self.id, None)
        left = set(self.namespaces) & _netns()
        if left:
            raise NetbedError(f"could not delete {sorted(left)} (see `ip netns pids NAME`)")
        return gone

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(self, *exc):
        self.down()

    # -- running things in it ---------------------------------------------------------------
    def exec_cmd(self, host: int, argv: list[str]) -> list[str]:
        """argv running ARGV in HOST's namespace, with hostname = that namespace's name."""
        if not 0 <= host < self.hosts:
            raise NetbedError(f"host {host} is not in bed {self.id} (hosts 0..{self.hosts - 1})")
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "/bin/sh", "-c",
                'hostname "$0" && exec "$@"', self.ns(host), *argv]

    def placement(self, np_: int, ppn: int | None = None,
                  rank_hosts: list[int] | None = None) -> list[int]:
        """Host of each rank: RANK_HOSTS as given, else blocks of PPN, else an even block split."""
        if rank_hosts is None:
            if ppn is None:
                counts = [np_ // self.hosts + (h < np_ % self.hosts) for h in range(self.hosts)]
                rank_hosts = [h for h, c in enumerate(counts) for _ in range(c)]
            else:
                rank_hosts = [r // ppn for r in range(np_)]
        if len(rank_hosts) != np_ or not all(0 <= h < self.hosts for h in rank_hosts):
            raise NetbedError(f"need one host in 0..{self.hosts - 1} for each of {np_} ranks, "
                              f"got {rank_hosts}")
        return list(rank_hosts)

    def mpiexec_cmd(self, np_: int, cmd: list[str], *, ppn: int | None = None,
                    rank_hosts: list[int] | None = None, transport: str = "ucx",
                    intra: str = "shm", env: dict[str, str] | None = None) -> list[str]:
        """argv of an MPICH hydra job of NP_ ranks running CMD across the bed over TCP.

        Consecutive ranks on one host share one hydra proxy (one "node" to MPI); a host named
        again after another (rank_hosts=[0, 1, 0]) gets a second proxy, which MPICH takes for
        another node. The caller's environment reaches every rank (-genvall) plus ENV.
        """
        if transport not in TRANSPORTS:
            raise NetbedError(f"transport {transport!r}: choose one of {sorted(TRANSPORTS)}")
        if intra not in ("shm", "tcp"):
            raise NetbedError(f"intra {intra!r}: choose shm or tcp")
        runs: list[list[int]] = []
        for h in self.placement(np_, ppn, rank_hosts):
            if runs and runs[-1][0] == h:
                runs[-1][1] += 1
            else:
                runs.append([h, 1])
        job_env = {"DBMPI_NETBED": self.id, **TRANSPORTS[transport],
                   **({"MPIR_CVAR_NOLOCAL": "1"} if intra == "tcp" else {}), **(env or {})}
        hosts = ",".join(f"{self.addr(h)}:{n}" for h, n in runs)
        return self.exec_cmd(0, ["env", *(f"{k}={v}" for k, v in job_env.items()), mpiexec(),
                                 "-launcher", "rsh", "-launcher-exec", str(EXEC),
                                 "-iface", IFACE, "-hosts", hosts, "-n", str(np_), "-genvall",
                                 *cmd])

    def run(self, argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        """subprocess.run with a timeout; on expiry everything in the bed is killed first."""
        try:
            return subprocess.run(argv, check=False, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise


def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel) or on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise NetbedError("no mpiexec: install the mpich wheel (pip install mpich)")
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _netns() -> set[str]:
    return {ln.split()[0] for ln in _run(["ip", "netns", "list"]).stdout.splitlines() if ln}


def beds() -> dict[str, Bed]:
    """Every bed on this machine, by id, rebuilt from the namespace names."""
    hosts: dict[tuple[int, str], int] = {}
    for ns in _netns():
        m = NS_RE.match(ns)
        if m and m.group(2) != "probe":
            key = (int(m.group(1)), m.group(2))
            h = 0 if m.group(3) == "br" else int(m.group(3)[1:]) + 1
            hosts[key] = max(hosts.get(key, 0), h)
    found = [Bed(max(1, n), name, owner=owner) for (owner, name), n in hosts.items()]
    return {b.id: b for b in sorted(found, key=lambda b: b.id)}


def find(bed_id: str | None) -> Bed:
    """The bed BED_ID (its id, or its name if only one bed has it), or $DBMPI_NETBED, or the
    only bed there is."""
    all_beds = beds()
    bed_id = bed_id or os.environ.get("DBMPI_NETBED")
    if bed_id:
        named = [b for b in all_beds.values() if b.name == bed_id]
        if bed_id not in all_beds and len(named) != 1:
            raise NetbedError(f"no bed {bed_id} (or more than one of that name); beds here: "
                              f"{sorted(all_beds) or 'none'}")
        return all_beds.get(bed_id) or named[0]
    if len(all_beds) != 1:
        raise NetbedError(f"say which bed (--bed ID or DBMPI_NETBED): {len(all_beds)} here "
                          f"{sorted(all_beds)}")
    return next(iter(all_beds.values()))


def stale() -> list[Bed]:
    """Beds whose creator is no longer running."""
    return [b for b in beds().values() if not Path(f"/proc/{b.owner}").exists()
            or _zombie(b.owner)]


if __name__ == "__main__":
    from tests.netbed_cli import main  # the CLI uses tests.netbed, not this __main__ copy

    sys.exit(main())
