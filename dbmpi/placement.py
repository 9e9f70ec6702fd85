"""Which host each MPI rank runs on: a pure planner (no MPI) for ``dbmpi launch --hosts``.

The rank order is fixed by :mod:`dbmpi.topology` (coordinator, S shards, then R replicas of
P partitions each); this module only chooses hosts for it:

* the coordinator runs on the first parameter-server host (``--ps-hosts``, default the first
  host); the shards are dealt over the ps hosts by load (coordinator counted), in contiguous
  blocks so that each host appears once in the launch line;
* each replica's P partitions share one host: they exchange activations every step;
* replicas are dealt round-robin over the hosts that are not ps hosts, skipping hosts without
  P free slots; only when those are full (or there are none) do the ps hosts' free slots take
  them. Each host's replicas are then numbered consecutively (the last ps host's first, then
  the other hosts in ``--hosts`` order, then the other ps hosts), so a host is one entry of
  the launch line whenever that is possible.

A plan that does not fit the slots raises a one-line :class:`PlacementError` that says the
fix, unless ``oversubscribe`` lets hosts take more ranks than slots.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import DbmpiError


class PlacementError(DbmpiError):
    """The hosts cannot hold the job as asked (exit status 2)."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


@dataclass(frozen=True)
class Place:
    """One rank of the plan; ``index`` is the shard or replica number."""

    rank: int
    role: str  # coordinator, shard, replica
    index: int
    partition: int
    host: str


# ---------------------------------------------------------------- host lists


def _host(item: str, field: str) -> Host:
    name, _, slots = item.strip().partition(":")
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise PlacementError(f"{field}: '{item}' is not a host name: write host or host:SLOTS, "
                             f"e.g. --hosts node1:8,node2:8")
    if not slots:
        return Host(name, 1)  # as MPICH's -hosts: a host without a count has one slot
    if not slots.isdigit() or int(slots) < 1:
        raise PlacementError(f"{field}: '{item}': the slot count must be a whole number >= 1, "
                             f"e.g. {name}:8")
    return Host(name, int(slots))


def _unique(hosts: list[Host], field: str) -> list[Host]:
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise PlacementError(f"{field}: host {h.name} is listed twice: list each host once "
                                 f"with its total slots ({h.name}:N)")
        seen.add(h.name)
    if not hosts:
        raise PlacementError(f"{field}: no hosts given: e.g. --hosts node1:8,node2:8")
    return hosts


def parse_hosts(spec: str, field: str = "--hosts") -> list[Host]:
    """``a:8,b:8,c`` -> hosts with slots (1 where no count is given)."""
    return _unique([_host(x, field) for x in spec.split(",") if x.strip()], field)


def read_hostfile(path: str | Path) -> list[Host]:
    """A hostfile: one host a line as ``host``, ``host:N`` (MPICH) or ``host slots=N`` (Open
    MPI); ``#`` starts a comment."""
    field = f"--hostfile {path}"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlacementError(f"{field}: cannot read it ({exc.strerror}): give a readable "
                             f"file of host:SLOTS lines") from None
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)(\s+.*)?", line)
        hosts.append(_host(f"{m[1]}:{m[2]}" if m else line, field))
    return _unique(hosts, field)


def _expand_ranges(body: str, field: str) -> list[str]:
    out = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise PlacementError(f"{field}: bad range '[{body}]' in the node list: expected "
                                 f"e.g. node[01-03,7]")
        width = len(lo)  # node[01-10] keeps the zero padding of its first bound
        out += [str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_nodelist(spec: str, field: str = "SLURM_JOB_NODELIST") -> list[str]:
    """SLURM's compact node list (``node[01-03,5],login1,rack[1-2]n[1-2]``) -> host names."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec + ","):  # split at the commas outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise PlacementError(f"{field}: unbalanced brackets in '{spec}'")
        if ch == "," and depth == 0:
            items.append(spec[start:i].strip())
            start = i + 1
    if depth:
        raise PlacementError(f"{field}: unbalanced brackets in '{spec}'")
    names = []
    for item in filter(None, items):
        expanded = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            parts = _expand_ranges(body, field) if body else [""]
            expanded = [e + text + p for e in expanded for p in parts]
        names += expanded
    return names


def expand_tasks_per_node(spec: str, field: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise PlacementError(f"{field}: '{spec}' is not of the form 2(x3),1")
        out += [int(m[1])] * int(m[2] or 1)
    return out


def slurm_hosts(env: dict, scontrol: str | None = None) -> list[Host]:
    """The allocation's nodes, with its tasks per node as slots.

    ``scontrol show hostnames`` expands the node list where it exists (it knows every form
    SLURM writes); the parser above is the fallback.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise PlacementError("SLURM_JOB_NODELIST is not set: run inside an allocation "
                             "(sbatch/salloc) or name the hosts with --hosts")
    names = None
    scontrol = scontrol or shutil.which("scontrol")
    if scontrol:
        try:
            r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=30, check=False)
            names = r.stdout.split() if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            names = None
    names = names or expand_nodelist(nodelist)
    tasks = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE")
    slots = expand_tasks_per_node(tasks) if tasks else [1] * len(names)
    if len(slots) != len(names):
        raise PlacementError(f"SLURM_TASKS_PER_NODE: '{tasks}' gives {len(slots)} counts for "
                             f"{len(names)} nodes ({nodelist}): name the hosts with --hosts")
    return _unique([Host(n, s) for n, s in zip(names, slots)], "SLURM_JOB_NODELIST")


# ---------------------------------------------------------------- the plan


# every "does not fit" error ends with the way round it
_OVER = ", or pass --oversubscribe"


def plan(shards: int, replicas: int, partitions: int, hosts: list[Host],
         ps_hosts: list[str] | None = None, oversubscribe: bool = False) -> list[Place]:
    """Rank -> host for 1 coordinator + ``shards`` + ``replicas`` x ``partitions`` ranks."""
    names = [h.name for h in hosts]
    ps = list(ps_hosts or names[:1])
    for name in ps:
        if name not in names:
            raise PlacementError(f"--ps-hosts: {name} is not one of the hosts ({', '.join(names)})"
                                 f": add it to --hosts or choose among those")
    if len(set(ps)) != len(ps):
        raise PlacementError("--ps-hosts: a host is listed twice: list each once")
    free = {h.name: h.slots for h in hosts}
    need = 1 + shards + replicas * partitions
    total = sum(free.values())
    if need > total and not oversubscribe:
        raise PlacementError(
            f"--hosts: the job needs {need} ranks (1 coordinator + {shards} shards + {replicas} "
            f"replicas x {partitions} partitions) but the hosts have {total} slots: add hosts "
            f"or slots (host:N){_OVER}")
    biggest = max(free.values())
    if partitions > biggest and not oversubscribe:
        raise PlacementError(
            f"topology.partitions: a replica's {partitions} partitions must share one host but "
            f"the largest host has {biggest} slots: give hosts at least {partitions} slots "
            f"(host:{partitions}) or lower topology.partitions{_OVER}")

    # coordinator and shards: each shard to the ps host with the fewest ranks so far among
    # those with a free slot (earlier host on ties); contiguous blocks in --ps-hosts order
    load = {name: 0 for name in ps}
    load[ps[0]] = 1
    free[ps[0]] -= 1
    counts = {name: 0 for name in ps}
    for _ in range(shards):
        open_ = [n for n in ps if free[n] > 0] or (ps if oversubscribe else [])
        if not open_:
            have = sum(h.slots for h in hosts if h.name in ps)
            raise PlacementError(
                f"--ps-hosts: the coordinator and {shards} shards need {shards + 1} slots but "
                f"the ps hosts ({', '.join(ps)}) have {have}: "
                "name more ps hosts (--ps-hosts a,b), give them "
                f"more slots, or lower topology.shards{_OVER}")
        best = min(open_, key=lambda n: (load[n], ps.index(n)))
        load[best] += 1
        counts[best] += 1
        free[best] -= 1
    places = [Place(0, "coordinator", 0, 0, ps[0])]
    for name in ps:
        for _ in range(counts[name]):
            places.append(Place(len(places), "shard", len(places) - 1, 0, name))

    # replicas: dealt round-robin over the other hosts, then over the ps hosts' free slots
    rings = [[n for n in names if n not in ps], ps]
    nexts = [0, 0]
    dealt = {name: 0 for name in names}
    for r in range(replicas):
        host = None
        for ring_no, ring in enumerate(rings):
            for k in range(len(ring)):
                cand = ring[(nexts[ring_no] + k) % len(ring)]
                if free[cand] >= partitions:
                    host, nexts[ring_no] = cand, (nexts[ring_no] + k + 1) % len(ring)
                    break
            if host:
                break
        if host is None and oversubscribe:  # plain round-robin once every host is full
            ring = rings[0] or rings[1]
            host = ring[r % len(ring)]
        if host is None:
            left = ", ".join(f"{n}:{free[n]}" for n in names)
            raise PlacementError(
                f"--hosts: replica {r} needs {partitions} free slots on one host but only "
                f"{left} are left: give hosts slots in multiples of topology.partitions "
                f"({partitions}) or add hosts{_OVER}")
        free[host] -= partitions
        dealt[host] += 1
    # Numbered host by host, so that each host's replicas are consecutive ranks, the last ps
    # host's right after its shards: hydra then needs one entry per host (ranks of two
    # entries do not share memory, even on one host), and replica numbers carry no meaning.
    r = 0
    for host in [ps[-1]] + rings[0] + ps[:-1]:
        for _ in range(dealt[host]):
            for p in range(partitions):
                places.append(Place(len(places), "replica", r, p, host))
            r += 1
    return places


# ---------------------------------------------------------------- launch lines and tables


def runs(places: list[Place]) -> list[tuple[str, int]]:
    """Consecutive ranks on the same host: [(host, count), ...] in rank order."""
    out: list[tuple[str, int]] = []
    for p in places:
        if out and out[-1][0] == p.host:
            out[-1] = (p.host, out[-1][1] + 1)
        else:
            out.append((p.host, 1))
    return out


def hydra_hosts(places: list[Place]) -> str:
    """The value of MPICH hydra's ``-hosts``: ``a:3,b:2,a:2``.

    Hydra gives ranks to the entries in order, ``count`` each, and keeps a host named twice
    as two entries (checked in tests/test_placement.py), so this realises any rank order.
    """
    return ",".join(f"{h}:{n}" for h, n in runs(places))


def rankfile(places: list[Place]) -> str:
    """An Open MPI rankfile (``mpirun --rankfile FILE``); slot = the rank's index on its host."""
    used: dict[str, int] = {}
    lines = []
    for p in places:
        lines.append(f"rank {p.rank}={p.host} slot={used.get(p.host, 0)}")
        used[p.host] = used.get(p.host, 0) + 1
    return "\n".join(lines) + "\n"


def table(places: list[Place]) -> str:
    """The dry-run table: rank, role, index, partition, host."""
    width = max([4] + [len(p.host) for p in places])
    lines = [f"{'rank':>5}  {'role':<11}  {'index':>5}  {'partition':>9}  host"]
    for p in places:
        lines.append(f"{p.rank:>5}  {p.role:<11}  {p.index:>5}  {p.partition:>9}  "
                     f"{p.host:<{width}}".rstrip())
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def host_lines(rows: list[dict], partitions: int) -> list[str]:
    """One start-up line per host from rows of rank, role, index, partition, host, pid:
    ``host h1: rank 0 coordinator (pid 12), ranks 1-2 shards 0-1 (pids 13,14)``.

    Consecutive ranks of one role (of one replica when it has several partitions) make one
    group, so a host's line stays short however many ranks it holds.
    """
    by_host: dict[str, list[list[dict]]] = {}
    for row in sorted(rows, key=lambda x: x["rank"]):
        groups = by_host.setdefault(row["host"], [])
        last = groups[-1][-1] if groups else None
        same = (last is not None and last["rank"] == row["rank"] - 1
                and last["role"] == row["role"]
                and (row["role"] != "replica" or partitions == 1
                     or last["index"] == row["index"]))
        if same:
            groups[-1].append(row)
        else:
            groups.append([row])
    lines = []
    for host, groups in by_host.items():
        parts = []
        for g in groups:
            ranks = [x["rank"] for x in g]
            pids = ",".join(str(x["pid"]) for x in g)
            many = len(g) > 1
            head = f"rank{'s' if many else ''} {_span(ranks)}"
            if g[0]["role"] == "coordinator":
                what = "coordinator"
            elif g[0]["role"] == "replica" and partitions > 1:
                what = f"replica {g[0]['index']} partition{'s' if many else ''} " \
                       f"{_span([x['partition'] for x in g])}"
            else:
                what = f"{g[0]['role']}{'s' if many else ''} {_span([x['index'] for x in g])}"
            parts.append(f"{head} {what} (pid{'s' if many else ''} {pids})")
        lines.append(f"host {host}: " + ", ".join(parts))
    return lines
