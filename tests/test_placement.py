"""dbmpi.placement: rank -> host plans, host lists and SLURM's node lists (no MPI here).

Every expected plan below was worked out by hand from the rule in docs/placement.md, not
produced by the planner.
"""

from __future__ import annotations

import pytest

from dbmpi import placement as pl
from dbmpi.placement import Host, PlacementError


def hosts_of(places):
    return [p.host for p in places]


def H(spec):
    return pl.parse_hosts(spec)


# ---------------------------------------------------------------- plans


def test_one_ps_host_replicas_on_the_others():
    places = pl.plan(2, 2, 1, H("a:4,b:2,c:2"))
    assert hosts_of(places) == ["a", "a", "a", "b", "c"]
    assert [(p.rank, p.role, p.index, p.partition) for p in places] == [
        (0, "coordinator", 0, 0), (1, "shard", 0, 0), (2, "shard", 1, 0),
        (3, "replica", 0, 0), (4, "replica", 1, 0)]


def test_shards_balanced_over_ps_hosts_and_partitions_kept_together():
    # ps a,b: coordinator on a (load 1), shard -> b (load 0), then a/b tie -> a, then a is
    # full (2 slots) -> b: a holds shard 0, b shards 1-2 (contiguous blocks in ps order).
    # Replicas of 2 partitions dealt round-robin over c, d: c, d, c; numbered host by host:
    # replicas 0-1 on c, replica 2 on d.
    places = pl.plan(3, 3, 2, H("a:2,b:2,c:4,d:4"), ps_hosts=["a", "b"])
    assert hosts_of(places) == ["a", "a", "b", "b", "c", "c", "c", "c", "d", "d"]
    assert [(p.role, p.index, p.partition) for p in places[4:]] == [
        ("replica", 0, 0), ("replica", 0, 1), ("replica", 1, 0), ("replica", 1, 1),
        ("replica", 2, 0), ("replica", 2, 1)]
    assert pl.hydra_hosts(places) == "a:2,b:2,c:4,d:2"


def test_coordinator_counts_in_the_shard_balance():
    # loads a=1 (coordinator), b=0: shards go b, a, b -> a holds shard 0, b shards 1-2
    places = pl.plan(3, 1, 1, H("a:8,b:8,c:8"), ps_hosts=["a", "b"])
    assert hosts_of(places) == ["a", "a", "b", "b", "c"]
    # the ps hosts in the order given: b takes the coordinator and the first block
    places = pl.plan(2, 1, 1, H("a:8,b:8,c:8"), ps_hosts=["b", "a"])
    assert hosts_of(places) == ["b", "b", "a", "c"]  # b: coordinator, shard 0; a: shard 1
    assert pl.hydra_hosts(places) == "b:2,a:1,c:1"


def test_replicas_spill_onto_the_ps_host_when_the_others_are_full():
    # dealt b, b, a; a's replica is numbered first, right after a's shard: one entry per host
    places = pl.plan(1, 3, 1, H("a:4,b:2"))
    assert hosts_of(places) == ["a", "a", "a", "b", "b"]
    assert pl.hydra_hosts(places) == "a:3,b:2"


def test_a_host_appears_twice_only_when_two_ps_hosts_take_replicas():
    # coordinator a; shard 0 a, shard 1 b (load balance); replicas dealt c, then a, b;
    # numbered b (after its shard), c, a
    places = pl.plan(2, 3, 1, H("a:3,b:2,c:1"), ps_hosts=["a", "b"])
    assert hosts_of(places) == ["a", "a", "b", "b", "c", "a"]
    assert pl.hydra_hosts(places) == "a:2,b:2,c:1,a:1"


def test_round_robin_skips_hosts_without_room_for_a_replica():
    # b has 1 slot < 2 partitions: dealt c, c (b skipped), then the ps host a;
    # numbered a's first (replica 0), then c's (replicas 1-2)
    places = pl.plan(1, 3, 2, H("a:4,b:1,c:4"))
    assert hosts_of(places) == ["a", "a", "a", "a", "c", "c", "c", "c"]


def test_one_host_holds_everything():
    places = pl.plan(2, 2, 1, H("solo:5"))
    assert hosts_of(places) == ["solo"] * 5
    assert pl.hydra_hosts(places) == "solo:5"


def test_every_host_is_a_ps_host():
    places = pl.plan(2, 2, 1, H("a:3,b:3"), ps_hosts=["a", "b"])
    # coordinator a; shard -> b, then tie a/b -> a (blocks: a shard 0, b shard 1);
    # replicas: no other host, dealt over the ps hosts a, b; numbered b's first
    assert hosts_of(places) == ["a", "a", "b", "b", "a"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args, kw, words", [
    ((2, 2, 1, "a:1,b:2"), {}, ["needs 5 ranks", "have 3 slots", "--oversubscribe"]),
    ((1, 1, 5, "a:4,b:4"), {}, ["topology.partitions", "largest host has 4 slots", "host:5"]),
    ((3, 1, 1, "a:2,b:8"), {}, ["--ps-hosts", "need 4 slots", "ps hosts (a) have 2"]),
    ((1, 3, 2, "a:3,b:3,c:2"), {}, ["replica 2 needs 2 free slots", "a:1, b:1, c:0"]),
    ((1, 1, 1, "a:2,b:2"), {"ps_hosts": ["z"]}, ["--ps-hosts: z is not one of the hosts"]),
    ((1, 1, 1, "a:2,b:2"), {"ps_hosts": ["a", "a"]}, ["listed twice"]),
])
def test_plans_that_do_not_fit_say_why_and_the_fix(args, kw, words):
    *topo, spec = args
    with pytest.raises(PlacementError) as exc:
        pl.plan(*topo, H(spec), **kw)
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 2
    for w in words:
        assert w in msg, msg


def test_oversubscribe_overfills_instead_of_refusing():
    assert hosts_of(pl.plan(2, 1, 1, H("a:1"), oversubscribe=True)) == ["a"] * 4
    # free slots first (b, c), then plain round-robin over b, c: b again
    places = pl.plan(1, 3, 2, H("a:3,b:3,c:2"), oversubscribe=True)
    assert hosts_of(places) == ["a", "a", "b", "b", "b", "b", "c", "c"]


@pytest.mark.parametrize("spec, words", [
    ("a:0", ["'a:0'", ">= 1"]), ("a:x", ["whole number"]), ("a,a:2", ["a is listed twice"]),
    ("", ["no hosts"]), ("a b", ["not a host name"]),
])
def test_bad_host_lists(spec, words):
    with pytest.raises(PlacementError) as exc:
        pl.parse_hosts(spec)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_host_without_count_has_one_slot():
    assert pl.parse_hosts("a:8, b") == [Host("a", 8), Host("b", 1)]


def test_hostfile_forms(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\nn1:4\nn2 slots=2  # Open MPI form\n\nn3\n")
    assert pl.read_hostfile(f) == [Host("n1", 4), Host("n2", 2), Host("n3", 1)]
    with pytest.raises(PlacementError, match="cannot read"):
        pl.read_hostfile(tmp_path / "missing")


# ---------------------------------------------------------------- SLURM


CASES = [
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("a,b[1-2]", ["a", "b1", "b2"]),
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("c[08-11]", ["c08", "c09", "c10", "c11"]),
    ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
    ("login1", ["login1"]),
    ("x[7],y-[1-2]", ["x7", "y-1", "y-2"]),
]
NODELISTS = [spec for spec, _ in CASES]
@pytest.mark.parametrize("spec, names", CASES)
def test_expand_nodelist(spec, names):
    assert pl.expand_nodelist(spec) == names


@pytest.mark.parametrize("spec", ["node[3-1]", "node[1-2", "node]1[", "n[a-b]"])
def test_bad_nodelists(spec):
    with pytest.raises(PlacementError, match="SLURM_JOB_NODELIST"):
        pl.expand_nodelist(spec)


def test_tasks_per_node():
    assert pl.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert pl.expand_tasks_per_node("8") == [8]
    with pytest.raises(PlacementError, match="SLURM_TASKS_PER_NODE"):
        pl.expand_tasks_per_node("2x3")


def test_slurm_hosts_parser_fallback_and_scontrol(tmp_path):
    env = {"SLURM_JOB_NODELIST": "node[01-03],gpu1", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    missing = str(tmp_path / "no-scontrol")  # cannot run: the parser expands the list
    assert pl.slurm_hosts(env, scontrol=missing) == [
        Host("node01", 2), Host("node02", 2), Host("node03", 2), Host("gpu1", 1)]
    fake = tmp_path / "scontrol"  # where scontrol runs, its expansion wins
    fake.write_text("#!/bin/sh\necho 'x1 x2'\necho x3\necho x4\n")
    fake.chmod(0o755)
    assert [h.name for h in pl.slurm_hosts(env, scontrol=str(fake))] == ["x1", "x2", "x3", "x4"]
    with pytest.raises(PlacementError, match="gives 2 counts for 4 nodes"):
        pl.slurm_hosts({**env, "SLURM_TASKS_PER_NODE": "2,2"}, scontrol=missing)
    with pytest.raises(PlacementError, match="run inside an allocation"):
        pl.slurm_hosts({}, scontrol=missing)


# ---------------------------------------------------------------- outputs


def test_rankfile_and_table():
    places = pl.plan(1, 2, 1, H("a:2,b:2"))
    assert pl.rankfile(places) == ("rank 0=a slot=0\nrank 1=a slot=1\nrank 2=b slot=0\n"
                                   "rank 3=b slot=1\n")
    lines = pl.table(places).splitlines()
    assert lines[0].split() == ["rank", "role", "index", "partition", "host"]
    assert [ln.split() for ln in lines[1:]] == [
        ["0", "coordinator", "0", "0", "a"], ["1", "shard", "0", "0", "a"],
        ["2", "replica", "0", "0", "b"], ["3", "replica", "1", "0", "b"]]


def test_host_lines_group_consecutive_ranks():
    def row(rank, role, index, partition, host, pid):
        return {"rank": rank, "role": role, "index": index, "partition": partition,
                "host": host, "pid": pid}

    rows = [row(0, "coordinator", 0, 0, "h1", 100), row(1, "shard", 0, 0, "h1", 101),
            row(2, "shard", 1, 0, "h1", 102), row(3, "replica", 0, 0, "h2", 103),
            row(4, "replica", 0, 1, "h2", 104), row(5, "replica", 1, 0, "h1", 105),
            row(6, "replica", 1, 1, "h1", 106)]
    assert pl.host_lines(rows, partitions=2) == [
        ("host h1: rank 0 coordinator (pid 100), ranks 1-2 shards 0-1 (pids 101,102), "
         "ranks 5-6 replica 1 partitions 0-1 (pids 105,106)"),
        "host h2: ranks 3-4 replica 0 partitions 0-1 (pids 103,104)"]
    one = [row(0, "coordinator", 0, 0, "h", 1), row(1, "shard", 0, 0, "h", 2),
           row(2, "replica", 0, 0, "h", 3), row(3, "replica", 1, 0, "h", 4)]
    assert pl.host_lines(one, partitions=1) == [
        ("host h: rank 0 coordinator (pid 1), rank 1 shard 0 (pid 2), "
         "ranks 2-3 replicas 0-1 (pids 3,4)")]
