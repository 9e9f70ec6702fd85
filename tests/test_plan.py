"""The planner: the cost model's pure parts against hand-computed cases, the search, and the
``dbmpi plan`` command on a synthetic calibration file (no MPI, no timing)."""

from __future__ import annotations

import json
import math

import pytest

from dbmpi import config as config_mod
from dbmpi.__main__ import main
from dbmpi.plan import calibrate as cal
from dbmpi.plan.cost import SHARD_HOT_S, Job, Link, Machine, Replica, downpour, sandblaster
from dbmpi.plan.figure3 import SPEECH, Cluster, curves, speech_exchange
from dbmpi.plan.search import Space, rank
from dbmpi.plan.shape import partition_plan, replica

SHM = Link(1e-6, 10e9)
M = Machine(cores=2, gflops=100.0, copy_bw=10e9, apply_bw=5e9, co_run=1.0,
            step_overhead_s=0.0, coordinator_cores=0.0, shm=SHM)


def rep1(compute=0.010, params=1_000_000, batch=100) -> Replica:
    return Replica(partitions=1, batch=batch, params=params, part_params=params,
                   compute_s=compute, cpu_s=compute, exchange_bytes=0, exchange_msgs=0)


def test_link_time_is_latency_per_message_plus_bytes_over_bandwidth():
    assert Link(1e-3, 1e6).time(2e6, messages=3) == pytest.approx(3e-3 + 2.0)


def test_sync_wait_interpolates_the_measured_points():
    m = Machine(**{**M.__dict__, "oversub_sync": ((1.0, 0.001), (2.0, 0.003))})
    assert m.sync_wait(1.0, crowded=False) == 0.0  # a core per rank: no descheduled peer
    assert m.sync_wait(0.5) == pytest.approx(0.001)  # pollers beside: the first point
    assert m.sync_wait(1.5) == pytest.approx(0.002)
    assert m.sync_wait(3.0) == pytest.approx(0.005)  # extrapolated along the last segment


def test_control_operations_cost_as_measured_once_ranks_outnumber_cores():
    # 2 shards, 1 replica, 2 cores: 4 ranks share them, so each of the 3 control operations
    # per shard and step costs what the gang probe measured at 0.5 busy ranks per core (the
    # first point, held below it), not the link's round trip
    m = Machine(**{**M.__dict__, "ctrl_ops": ((1.0, 1e-4), (2.0, 3e-4))})
    assert m.ctrl_op(1.5) == pytest.approx(2e-4)
    assert m.ctrl_op(1.5, crowded=False) == pytest.approx(2e-6)
    p = downpour(rep1(), Job(shards=2, replicas=1, cores_per_host=2), m)
    assert p.breakdown["fetch"] == pytest.approx(4e6 / 10e9 + 2 * 1e-4)
    assert p.breakdown["push"] == pytest.approx(2 * 2 * 1e-4)


def test_steal_slows_every_ranks_cpu_work_and_the_cores_capacity():
    # a hypervisor that takes 25% of a running rank's time: alone (a core per rank), the
    # step's CPU parts run at 0.75 of their pace, the control operations do not change
    job = Job(shards=1, replicas=1, cores_per_host=3)
    base = downpour(rep1(), job, M)
    p = downpour(rep1(), Job(**{**job.__dict__, "steal": 0.25}), M)
    assert p.breakdown["compute"] == pytest.approx(0.010 / 0.75)
    assert p.breakdown["fetch"] == pytest.approx(4e6 / 10e9 / 0.75 + 2e-6)
    assert p.breakdown["push"] == pytest.approx(base.breakdown["push"])
    # 4 replicas on 2 cores: the round's CPU demand (as in the test above) on 0.75 x 2 cores
    crowd = downpour(rep1(), Job(shards=1, replicas=4, cores_per_host=2, steal=0.25), M)
    per_round = 4 * (0.010 + 4e6 / 10e9) + 4 * 4e6 / 5e9
    assert crowd.samples_per_s == pytest.approx(0.75 * 4 * 100 * 2 / per_round)


def test_steal_holds_up_a_lockstep_gang_while_any_of_its_vcpus_is_taken():
    # a replica cut in 2, a core per rank (1 + 1 + 2 ranks on 4 cores), 20% steal: the gang
    # runs while both its vCPUs run, 0.8^2 = 0.64 of the time
    m4 = Machine(**{**M.__dict__, "cores": 4})
    half = Replica(partitions=2, batch=100, params=10**6, part_params=5 * 10**5,
                   compute_s=0.005, cpu_s=0.010, exchange_bytes=0, exchange_msgs=0)
    p = downpour(half, Job(shards=1, replicas=1, partitions=2, cores_per_host=4, steal=0.2), m4)
    assert p.breakdown["compute"] == pytest.approx(0.005 / 0.64)
    assert p.breakdown["fetch"] == pytest.approx(2e6 / 10e9 / 0.64 + 2e-6)
    # the cores idle with the gang: 4 cores at 0.64 carry its layers, copies and the apply
    assert p.utilisation["cores of host 0"] == pytest.approx(
        (0.010 + 2 * 2e6 / 10e9 + 4e6 / 5e9) / p.step_s / (4 * 0.64))
    # the shard is one rank: it loses only its own 20%
    assert p.utilisation["shard 0"] == pytest.approx(4e6 / 5e9 / p.step_s / 0.8)
    # one partition: no gang, the plain 0.8 (as in the test above)
    one = downpour(rep1(compute=0.005), Job(shards=1, replicas=1, cores_per_host=4, steal=0.2),
                   m4)
    assert one.breakdown["compute"] == pytest.approx(0.005 / 0.8)
    # cut in 4 on the 4 cores it spans all 4: 0.8^4; on 2 cores only the 2 there are: 0.8^2
    quarter = Replica(partitions=4, batch=100, params=10**6, part_params=25 * 10**4,
                      compute_s=0.005, cpu_s=0.020, exchange_bytes=0, exchange_msgs=0)
    for cores, g in ((4, 4), (2, 2)):
        mc = Machine(**{**M.__dict__, "cores": cores})
        q = downpour(quarter, Job(shards=1, replicas=1, partitions=4, cores_per_host=cores,
                                  steal=0.2), mc)
        assert q.breakdown["compute"] == pytest.approx(0.005 / 0.8**g)


def test_pace_scales_cpu_work_as_steal_does_and_combines_with_it():
    # a machine at 0.8 of its calibrated pace with 25% steal: CPU work at 0.6 of calibrated
    job = Job(shards=1, replicas=1, cores_per_host=3)
    slow = downpour(rep1(), Job(**{**job.__dict__, "pace": 0.8, "steal": 0.25}), M)
    assert slow.breakdown["compute"] == pytest.approx(0.010 / 0.6)
    assert slow.breakdown["fetch"] == pytest.approx(4e6 / 10e9 / 0.6 + 2e-6)
    crowd = downpour(rep1(), Job(shards=1, replicas=4, cores_per_host=2, pace=1.25), M)
    per_round = 4 * (0.010 + 4e6 / 10e9) + 4 * 4e6 / 5e9
    assert crowd.samples_per_s == pytest.approx(1.25 * 4 * 100 * 2 / per_round)


def test_steal_share_is_stolen_over_non_idle_time():
    from dbmpi.plan.procstat import steal_share

    # (all, idle + iowait, steal) jiffies: 100 more, 50 of them idle, 10 stolen
    assert steal_share((1000, 400, 5), (1100, 450, 15)) == pytest.approx(10 / 50)
    assert steal_share((1000, 400, 5), (1100, 500, 5)) == 0.0  # all idle: nothing known
    assert steal_share((0, 0, 0), (0, 0, 0)) == 0.0  # no /proc/stat


def test_idle_shards_polling_take_cores_from_the_replicas():
    # 2 replicas fill 2 cores; each of 4 shards polls 0.05 of a core: the cores left are
    # 2 - 4 x 0.05, shared per round by 2 x 10 ms of compute, 2 x 4 MB / 5 GB/s of apply
    # and 2 fetches of 4 MB copied at 10 GB/s
    m = Machine(**{**M.__dict__, "shard_poll_cores": 0.05})
    p = downpour(rep1(), Job(shards=4, replicas=2, cores_per_host=2), m)
    assert p.bottleneck == "cores of host 0"
    assert p.step_s == pytest.approx((2 * 0.010 + 2 * 4e6 / 5e9 + 2 * 4e6 / 1e10)
                                     / (2 - 4 * 0.05))


def test_one_replica_alone_is_compute_plus_fetch():
    # 1 shard on the same host, a core for each of the 3 ranks: a control operation is a
    # round trip (2 us); fetch = 4 MB / 10 GB/s + a read of the shard's counters; posting the
    # push = a read of the slot's state + a Fetch_and_op on SEQ
    p = downpour(rep1(), Job(shards=1, replicas=1, cores_per_host=3), M)
    step = 0.010 + 4e6 / 10e9 + 2e-6 + 2 * 2e-6
    assert p.step_alone_s == pytest.approx(step)
    assert p.samples_per_s == pytest.approx(100 / step)
    assert p.bottleneck == "replica step: compute"
    # the shard applies 4 MB at 5 GB/s per step: busy 0.8 ms of every step
    assert p.ps_utilisation == pytest.approx(4e6 / 5e9 / step)
    assert p.bytes_per_step["shared memory"] == pytest.approx(8e6)


def test_replicas_beyond_the_cores_share_them():
    # 4 replicas on 2 cores: per round 4 x (10 ms compute + 0.4 ms copy) + 4 x 0.8 ms apply
    p = downpour(rep1(), Job(shards=1, replicas=4, cores_per_host=2), M)
    per_round = 4 * (0.010 + 4e6 / 10e9) + 4 * 4e6 / 5e9
    assert p.bottleneck == "cores of host 0"
    assert p.samples_per_s == pytest.approx(4 * 100 * 2 / per_round)
    assert p.utilisation["cores of host 0"] == pytest.approx(1.0)
    assert p.notes and "share cores" in p.notes[0]


def test_other_tenants_take_turns_with_compute_once_no_core_is_free():
    # 1 replica on 2 cores beside 1 busy core of another tenant: every core computes, so the
    # tenant's share of the step (1 core x 10 ms) is spread over the 2 cores
    job = Job(shards=1, replicas=1, cores_per_host=2, background_cores=1.0)
    p = downpour(rep1(), job, M)
    assert p.breakdown["compute"] == pytest.approx(0.010 + (4e6 / 5e9 + 0.010) / 2)
    # half a core of background: 3 ranks + 0.5 still outnumber 2 cores, so the scheduler
    # spreads the shard's apply and the tenant's half core over both (one is the replica's)
    half = downpour(rep1(), Job(**{**job.__dict__, "background_cores": 0.5}), M)
    assert half.breakdown["compute"] == pytest.approx(0.010 + (4e6 / 5e9 + 0.5 * 0.010) / 2)
    # 4 cores for 3 ranks and half a core: every rank has a core, no slowdown
    roomy = downpour(rep1(), Job(**{**job.__dict__, "background_cores": 0.5,
                                    "cores_per_host": 4}), M)
    assert roomy.breakdown["compute"] == pytest.approx(0.010)


def test_a_slow_shard_is_the_bottleneck_and_more_shards_relieve_it():
    slow = Machine(**{**M.__dict__, "apply_bw": 1e8, "cores": 64})
    big = Job(shards=1, replicas=2, cores_per_host=64)
    p1 = downpour(rep1(compute=0.001), big, slow)
    assert p1.bottleneck == "shard 0"
    assert p1.samples_per_s == pytest.approx(100 / (2 * 4e6 / 1e8) * 2)  # 1 round per 80 ms
    p4 = downpour(rep1(compute=0.001), Job(shards=4, replicas=2, cores_per_host=64), slow)
    assert p4.samples_per_s == pytest.approx(4 * p1.samples_per_s)


def test_remote_replicas_wait_for_their_traffic_and_share_the_ps_link():
    # 3 hosts: the shard on host 0, one replica on each of hosts 1 and 2, 100 MB/s links,
    # full duplex. Each step moves a 4 MB fetch (out of host 0) and a 4 MB push (into it),
    # v = 40 ms each alone, not hidden behind compute (TCP progress); a fetch meets the other
    # replica's fetch for the share v s / (r + 2 v s) of its step (a push likewise), so
    # s = 1 + v s / (r + 2 v s): 2 v s^2 + (r - 3 v) s - r = 0
    job = Job(shards=1, replicas=2, hosts=3, cores_per_host=8, link=Link(1e-4, 1e8))
    p = downpour(rep1(), job, Machine(**{**M.__dict__, "cores": 8}))
    # compute; the fetch's counter read and the push's two control operations, each a round
    # trip of the link (2 x 100 us)
    v, r = 4e6 / 1e8, 0.010 + 3 * 2e-4
    s = (-(r - 3 * v) + math.sqrt((r - 3 * v) ** 2 + 8 * v * r)) / (4 * v)
    assert p.step_alone_s == pytest.approx(r + 1e-4 + 2 * v * s)  # + the Get's latency
    assert p.bottleneck in ("replica step: fetch", "replica step: push")
    # each direction of the ps host's NIC: 2 x 4 MB per round at 100 MB/s
    assert p.utilisation["NIC of host 0 out"] == pytest.approx(0.08 / p.step_s)
    assert p.utilisation["NIC of host 0 in"] == pytest.approx(0.08 / p.step_s)
    # host 0's cores: the shard pulls (in MPI while the wire moves it) and applies each of
    # the 2 pushes per round, then spins SHARD_HOT_S
    assert p.utilisation["cores of host 0"] == pytest.approx(
        2 * (4e6 / M.apply_bw + 4e6 / 1e8 + SHARD_HOT_S) / p.step_s / (8 - M.coordinator_cores))
    assert p.bytes_per_step["host 1 <-> host 0"] == pytest.approx(4e6)  # half: 2 replicas
    # a faster link lifts the step
    fast = downpour(rep1(), Job(**{**job.__dict__, "link": Link(1e-4, 1e9)}),
                    Machine(**{**M.__dict__, "cores": 8}))
    assert fast.samples_per_s > 3 * p.samples_per_s


def test_partitioned_replica_counts_the_plans_transfers():
    layers = [{"type": "dense", "units": 8, "activation": "relu"}]
    plan = partition_plan((4,), layers, 2, 2)
    r = replica(plan, [0.002, 0.001], batch=10)
    # each partition computes 4 of 8 hidden units and 1 of 2 logits: half of every layer
    assert r.compute_s == pytest.approx(0.0015)
    assert r.cpu_s == pytest.approx(0.003)
    # forward: 4 hidden units to the peer, then 1 logit; backward: 4 unit gradients back
    assert r.exchange_bytes == (4 + 1 + 4) * 10 * 4
    assert r.syncs == 3
    assert r.params == (4 * 8 + 8) + (8 * 2 + 2)


def rep4(compute=0.005, cpu=0.020, msgs=6, syncs=3) -> Replica:
    return Replica(partitions=4, batch=100, params=400_000, part_params=100_000,
                   compute_s=compute, cpu_s=cpu, exchange_bytes=0, exchange_msgs=msgs,
                   syncs=syncs)


def test_partitions_pay_their_exchange_cpu_per_message():
    # 4 partitions with a core each (8 cores): the exchange is the link's time plus the
    # measured CPU per message, on the step and on the cores
    m = Machine(**{**M.__dict__, "cores": 8, "exchange_msg_s": 1e-4})
    job = Job(shards=1, replicas=1, partitions=4, cores_per_host=8)
    p = downpour(rep4(), job, m)
    assert p.breakdown["exchange"] == pytest.approx(6 * 1e-6 + 6 * 1e-4)
    base = downpour(rep4(), job, Machine(**{**M.__dict__, "cores": 8}))

    def core_seconds(pred):  # per step of the replica: busy fraction x capacity / steps/s
        return pred.utilisation["cores of host 0"] * 8 / (pred.samples_per_s_replica / 100)
    assert core_seconds(p) - core_seconds(base) == pytest.approx(4 * 6 * 1e-4)


def test_a_gang_beyond_the_cores_shares_them_and_idles_them_at_each_sync():
    # 4 partitions + a shard + the coordinator on 2 cores: 2 busy ranks per core. The
    # partitions' CPU (layers, fetch copies, the exchange's per message) and the shard's apply
    # over the 2 cores, plus the measured gap per synchronisation at 2 busy ranks per core
    m = Machine(**{**M.__dict__, "exchange_msg_s": 1e-4,
                   "oversub_sync": ((1.0, 1e-4), (2.0, 5e-4))})
    p = downpour(rep4(), Job(shards=1, replicas=1, partitions=4, cores_per_host=2), m)
    fetch_copy = 4 * (4 * 100_000) / 10e9  # each partition copies its 100k floats
    apply = 4 * (4 * 100_000) / 5e9  # the shard applies every partition's push
    busy = 0.020 + fetch_copy + 4 * 6 * 1e-4 + apply
    assert p.bottleneck == "cores of host 0"
    assert p.step_s == pytest.approx(busy / 2 + 3 * 5e-4)
    assert p.breakdown["exchange"] == pytest.approx(
        6 * 1e-6 + 3 * 5e-4 + 6 * 1e-4 + apply)  # the shard's apply preempts a partition


def test_speech_exchange_matches_the_partition_plan():
    for P in (2, 4):
        plan = partition_plan(SPEECH["input"], SPEECH["layers"], SPEECH["classes"], P)
        assert speech_exchange(P, 16)[0] == max(plan.bytes_per_step(16))


def test_figure3_shapes_fully_connected_peaks_and_local_keeps_scaling():
    c = Cluster("t", 8, 8.0, Link(100e-6, 0.94e9 / 8))
    cv = curves(c, machines=(1, 2, 4, 8, 16, 32, 64, 128))
    speech = dict(cv["speech"])
    best = max(speech, key=speech.get)
    assert 4 <= best <= 32 and speech[128] < speech[best]
    image = [s for _, s in cv["image"]]
    assert image[-1] > 8 and image[-1] == max(image)


def test_sandblaster_iteration_spreads_compute_over_replicas():
    m = Machine(**{**M.__dict__, "cores": 64})
    job = Job(shards=2, replicas=4, cores_per_host=64)
    out = sandblaster(rep1(compute=0.010, batch=100), job, m, examples=4000, portions=16)
    assert out["breakdown"]["compute"] == pytest.approx(4000 * 1e-4 / 4)
    assert out["bottleneck"] == "compute"


def test_search_respects_max_ranks_and_ranks_best_first():
    base = Job(shards=1, replicas=1, cores_per_host=2)
    space = Space(hosts=1, cores_per_host=2, max_ranks=6, partitions=(1, 2))
    plan2 = partition_plan((4,), [{"type": "dense", "units": 8}], 2, 2)
    reps = {1: rep1(), 2: replica(plan2, [0.006, 0.004], 100)}
    best = rank(space, base, reps.get, lambda r, j: downpour(r, j, M), top=50)
    assert all(p.job.ranks <= 6 for p in best)
    scores = [p.samples_per_s * 0.98 ** math.log2(p.job.n_fetch) for p in best]
    assert scores[0] >= max(scores) * 0.99


# ------------------------------------------------------------------------------- the CLI

CONFIG = """algorithm = "downpour"
[topology]
shards = 1
replicas = 1
[model]
layers = [{type = "dense", units = 64, activation = "relu"}]
[data]
path = "nowhere"
batch_size = 32
"""


def synthetic_calibration(path, layers, batch=32):
    sig = cal.signature((28, 28), layers, 10, "softmax", batch)
    path.write_text(json.dumps({
        "version": cal.VERSION, "host": "test",
        "machine": {"cores": 2, "gflops": 90.0, "copy_bw": 1e10, "apply_bw": 5e9,
                    "co_run": 0.95, "step_overhead_s": 1e-5, "coordinator_cores": 0.04,
                    "shm": {"latency_s": 2e-6, "bandwidth": 1e10},
                    "oversub_sync": [[1.0, 3e-4], [2.0, 2.6e-3]], "shard_poll_cores": 0.05},
        "links": {"netbed-1gbit": {"latency_s": 3e-4, "bandwidth": 1.2e8}},
        "layers": {sig: {"batch": batch, "seconds": [0.002, 0.0004], "reader_s": 1e-4}}}))


@pytest.fixture
def planned(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    calib = tmp_path / "calib.json"
    synthetic_calibration(calib, [{"type": "dense", "units": 64, "activation": "relu"}])
    return cfg, calib


def test_plan_ranks_and_writes_a_config_the_loader_accepts(planned, tmp_path, capsys):
    cfg, calib = planned
    out = tmp_path / "best.toml"
    rc = main(["plan", str(cfg), "--calibration", str(calib), "--input", "28x28",
               "--classes", "10", "--write", str(out), "--top", "3"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "this config: S=1 R=1 P=1" in text and "1. S=" in text and "3. S=" in text
    loaded = config_mod.load(out)
    assert loaded.model.layers == config_mod.load(cfg).model.layers
    assert loaded.topology.world_size <= 6


def test_plan_with_a_measured_link_over_hosts(planned, capsys):
    cfg, calib = planned
    assert main(["plan", str(cfg), "--calibration", str(calib), "--input", "28x28",
                 "--classes", "10", "--hosts", "3", "--link", "MEASURED"]) == 0
    assert "3 host(s)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, code, words", [
    (["--hosts", "0"], 2, "--hosts 0: must be >= 1"),
    (["--link", "fast"], 2, "--link fast: not a rate"),
    (["--calibration", "{missing}"], 3, "--calibrate"),
])
def test_bad_plan_inputs_give_one_line_and_a_distinct_status(planned, tmp_path, capsys,
                                                              extra, code, words):
    cfg, calib = planned
    extra = [e.replace("{missing}", str(tmp_path / "none.json")) for e in extra]
    args = ["plan", str(cfg), "--input", "28x28", "--classes", "10"]
    if "--calibration" not in extra:
        args += ["--calibration", str(calib)]
    assert main(args + extra) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_a_models_own_co_run_replaces_the_machines(tmp_path):
    """The replicas' co-run slowdown measured with the model's own step (fetch copy + layers)
    is the one the model uses for that model; other models keep sgemm's."""
    layers = [{"type": "dense", "units": 64, "activation": "relu"}]
    path = tmp_path / "calib.json"
    synthetic_calibration(path, layers)
    data = json.loads(path.read_text())
    sig = cal.signature((28, 28), layers, 10, "softmax", 32)
    assert cal.machine_for(data, sig).co_run == 0.95
    data["layers"][sig]["co_run"] = 0.8
    assert cal.machine_for(data, sig).co_run == 0.8
    assert cal.machine_for(data, "another model").co_run == 0.95
    # and it slows two replicas that share the cores: compute / 0.8 once both cores compute
    m = cal.machine_for(data, sig)
    p = downpour(rep1(), Job(shards=1, replicas=2, cores_per_host=2), m)
    assert p.breakdown["compute"] >= 0.010 / 0.8


def test_gang_probe_keeps_the_least_disturbed_of_its_repeats(monkeypatch):
    # 2 cores: gangs of 2 and 4 ranks, 3 runs each; the second run of the first gang was
    # disturbed (a gap of 2.0 ms, not 0.3), the third of the second gang too
    runs = iter([{"step_s": s, "compute_s": c, "ctrl_op_s": op, "poll_cores": pc}
                 for s, c, op, pc in [
                     (0.0023, 0.002, 3e-5, 0.04), (0.0040, 0.002, 1.5e-4, 0.05),
                     (0.0024, 0.002, 4e-5, 0.06),
                     (0.0045, 0.002, 3e-4, 0.04), (0.0044, 0.002, 2e-4, 0.05),
                     (0.0075, 0.002, 9e-4, 0.05)]])
    monkeypatch.setattr("dbmpi.launch.find_mpiexec", lambda: "mpiexec")
    monkeypatch.setattr(cal, "_probe", lambda cmd, env, what, timeout: next(runs))
    sync, ops, poll = cal.measure_gang(2)
    # beyond time-sharing: step - max(1, busy per core) x work; 2 busy per core: 2 x 2 ms
    assert sync == [[1.0, pytest.approx(0.0003)], [2.0, pytest.approx(0.0004)]]
    assert ops == [[1.0, 3e-5], [2.0, 2e-4]]
    assert poll == pytest.approx(0.05)  # the median of all six


def test_missing_cache_names_the_file_and_the_fix(planned, tmp_path, capsys, monkeypatch):
    cfg, _ = planned
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["plan", str(cfg), "--input", "28x28", "--classes", "10"]) == 3
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "cache" / "dbmpi") in err and "dbmpi plan CONFIG --calibrate" in err
