"""The planner's cost model against measured Downpour jobs: predicted / measured samples/s.

One model (784-1024-1024-10 ReLU MLP, 1.86M parameters, batch 128, Adagrad, synthetic 28x28
images from ``data_tools synth``), short jobs of ``--steps`` steps per replica:

1. **One node**: (S, R, P) over S = 1, 2, 4; R = 1, 2; P = 1, 2, 4 (at most 6 ranks, so on
   2 cores most points oversubscribe), n_fetch = n_push = 1.
2. **Multi-host bed** (tests/netbed.py, needs root): 3 namespace hosts, coordinator and
   shards on host 0, one replica on each of hosts 1 and 2, links shaped with ``tc tbf``;
   the link is measured first (``dbmpi.plan.linkprobe`` between hosts 0 and 1) and the
   prediction uses that measurement.

The machine is shared with other sessions: before the calibration and before each job the
script waits (up to 45 s) until other tenants keep at most 0.3 cores busy, and records what
they kept busy ("others' cores") and, over the job, the hypervisor's steal share of our
running time (:mod:`dbmpi.plan.procstat`; 0.13-0.31 on a busy cloud host). "predicted"
assumes an otherwise idle machine with no steal; "given" gives the model the measured
others' cores (``Job.background_cores``) and steal (``Job.steal``). This VM's pace also
moves with no steal to show for it (neighbours on the same physical cores and memory: the
calibrated sgemm rate was 149, 111 and 60 GFLOP/s in three runs of one day), so each job runs
between two 1 s probes of the model's step in one process, and "given pace" gives the model
their mean against the same probe right after each calibration (``Job.pace``).
The machine is calibrated first (``dbmpi.plan.calibrate``, into a throwaway file). Each
point runs ``--repeats`` times, the rounds interleaved (this VM's pace drifts by 10-20% over
minutes), and the layers are timed again before each round: the prediction uses each layer's
median time, the measurement the median run. A run's samples/s = median over the steady
windows of each replica (the first window, which holds start-up, is dropped), summed over
replicas. Also checked: is the planner's top choice among
the measured points within 10% of the best measured one?

    python benchmarks/plan.py [--steps 300] [--repeats 3] [--links 1gbit 10gbit] [--skip bed]
    python benchmarks/plan.py --table RESULT.json   # an earlier run's table, this model

Prints the table and writes ``benchmarks/results/plan.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, machine_info, print_table, write_json  # noqa: E402
from _jobs import run_job  # noqa: E402

from dbmpi.plan import calibrate as cal  # noqa: E402
from dbmpi.plan import procstat  # noqa: E402
from dbmpi.plan.cost import Job, Link, downpour  # noqa: E402
from dbmpi.plan.shape import partition_plan, replica  # noqa: E402

PY = sys.executable
LAYERS = [{"type": "dense", "units": 1024, "activation": "relu"},
          {"type": "dense", "units": 1024, "activation": "relu"}]
SHAPE, CLASSES, BATCH = (28, 28), 10, 128
ONE_NODE = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (1, 1, 4),
            (2, 1, 2), (1, 2, 2)]
BED = [(2, 2, 1, 1), (2, 2, 1, 4)]  # S, R, P, n_fetch = n_push
CONFIG = f"""algorithm = "downpour"
[topology]
shards = 1
replicas = 1
[model]
layers = {json.dumps(LAYERS).replace('":', '" =')}
loss = "softmax"
[data]
path = "data"
batch_size = {BATCH}
shuffle_buffer = 4096
[optimizer]
name = "adagrad"
learning_rate = 0.01
[downpour]
steps = 300
warm_start_steps = 0
eval_every_s = 1000.0
log_every = 50
[checkpoint]
every_s = 0.0
[run]
name = "plan-bench"
"""


def make_data(root: Path) -> Path:
    idx, shards = root / "idx", root / "shards"
    for argv in (["synth", "--out", str(idx), "--train", "12000", "--test", "1000"],
                 ["shard", "idx", "--src", str(idx), "--out", str(shards), "--shards", "4"]):
        subprocess.run([PY, "-m", "data_tools", *argv], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return shards


FIELDS = ("fetch_fraction", "push_fraction", "ctrl_fraction", "partition_wait_s")


def measured(records: list[dict], replicas: int) -> tuple[float, dict]:
    """Samples/s summed over replicas, and medians of the step's fractions (replica 0)."""
    train = [r for r in records if r["kind"] == "train"]
    total, detail = 0.0, {}
    for k in range(replicas):
        mine = sorted((r for r in train if r["replica"] == k), key=lambda r: r["step"])
        steady = mine[1:] or mine
        total += statistics.median(r["samples_per_s"] for r in steady)
        if k == 0:
            detail = {f: statistics.median(r[f] for r in steady) for f in FIELDS
                      if f in steady[0]}
    return total, detail


def overrides(data: Path, S: int, R: int, P: int, n: int, steps: int) -> list[str]:
    return [f"data.path={json.dumps(str(data))}", f"topology.shards={S}",
            f"topology.replicas={R}", f"topology.partitions={P}", f"downpour.n_fetch={n}",
            f"downpour.n_push={n}", f"downpour.steps={steps}"]


def wait_quiet(timeout: float = 45.0, most: float = 0.3) -> float:
    """Wait (up to ``timeout`` s) until other tenants keep at most ``most`` cores busy (the
    machine is shared); return the last reading, recorded with the point."""
    t_end = time.time() + timeout
    while True:
        busy = procstat.busy_cores(1.0)
        if busy <= most or time.time() > t_end:
            return busy


def predict(calib: dict, S: int, R: int, P: int, n: int = 1, hosts: int = 1,
            link: Link | None = None, background: float = 0.0, steal: float = 0.0,
            pace: float = 1.0) -> object:
    machine = cal.machine_for(calib, cal.signature(SHAPE, LAYERS, CLASSES, "softmax", BATCH))
    times = calib["layers"][cal.signature(SHAPE, LAYERS, CLASSES, "softmax", BATCH)]
    rep = replica(partition_plan(SHAPE, LAYERS, CLASSES, P), times["seconds"], BATCH,
                  times["batch"], times["reader_s"])
    job = Job(S, R, P, n, n, hosts=hosts, cores_per_host=machine.cores, link=link,
              shared_cores=hosts > 1, background_cores=background, steal=steal, pace=pace)
    return downpour(rep, job, machine)


SPEC = json.dumps([list(SHAPE), LAYERS, CLASSES, "softmax", BATCH])


def step_rate() -> float:
    """Steps/s of the model's own step in one process for 1 s (the calibration's worker): the
    machine's pace now, steal and neighbours included."""
    return cal._run_worker(["--step", SPEC, "1.0"])["steps_per_s"]


def reference_rate() -> float:
    """The step probe's steal-free rate (the pace 1.0 of the calibration just made)."""
    before = procstat.sample()
    rate = statistics.median(step_rate() for _ in range(3))
    return rate / max(0.1, 1 - procstat.steal_share(before, procstat.sample()))


def run_probed(row: dict, job) -> tuple[list[dict], float, float, float]:
    """Run ``job()`` (returns the metric records) between two pace probes; the records, the
    load and others' cores before it, the steal over it. The probes' mean goes to the row."""
    bg = wait_quiet()
    load = os.getloadavg()[0]
    rate = step_rate()
    before = procstat.sample()
    recs = job()
    steal = procstat.steal_share(before, procstat.sample())
    row["step_rates"].append((rate + step_rate()) / 2)
    return recs, load, bg, steal


def _point(where: str, S: int, R: int, P: int, n: int) -> dict:
    return {"where": where, "S": S, "R": R, "P": P, "n": n, "runs": [], "details": [],
            "loads": [], "others": [], "steals": [], "step_rates": []}


def _measure(row: dict, recs: list[dict], load: float, bg: float, steal: float) -> None:
    got, detail = measured(recs, row["R"])
    row["runs"].append(got)
    row["details"].append(detail)
    row["loads"].append(load)
    row["others"].append(bg)
    row["steals"].append(steal)
    print(f"  {row['where']} S={row['S']} R={row['R']} P={row['P']} n={row['n']}: "
          f"{got:.0f} samples/s (load {load:.2f}, others' cores {bg:.2f}, steal {steal:.2f}) "
          f"{detail}", flush=True)


def one_node(cfg: str, data: Path, steps: int, repeats: int, remeasure) -> list[dict]:
    """Every point ``repeats`` times, interleaved (the machine's pace drifts over minutes);
    ``remeasure()`` times the layers again before each later round."""
    rows = [_point("1 node", S, R, P, 1) for S, R, P in ONE_NODE]
    for round_ in range(repeats):
        if round_:
            remeasure()
        for row in rows:
            def job(row=row):
                return run_job(cfg, overrides(data, row["S"], row["R"], row["P"], 1, steps),
                               threads=1, timeout=300)[1]
            recs, load, bg, steal = run_probed(row, job)
            _measure(row, recs, load, bg, steal)
    return rows


def bed_points(calib: dict, cfg: str, data: Path, steps: int, links: list[str],
               path: Path, repeats: int) -> list[dict]:
    from tests.netbed import YIELD_ENV, Bed, unavailable

    why = unavailable()
    if why:
        print(f"plan.py: skipping the multi-host bed: {why}", flush=True)
        return []
    env = {**os.environ, **YIELD_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rows = []
    with Bed(2, name="plancpu") as bed:  # unshaped: the TCP stack's CPU per byte, no waiting
        lk = cal.measure_link(lambda c: bed.mpiexec_cmd(2, c, rank_hosts=[0, 1]), env=env)
    tcp_cpu = calib["tcp_cpu_s_per_byte"] = lk["cpu_s_per_byte_with_polling"]
    print(f"  TCP CPU per byte (unshaped veth): {tcp_cpu:.3g} s", flush=True)
    for rate in links:
        with Bed(3, name="plan", rate=rate) as bed:
            lk = cal.measure_link(lambda c: bed.mpiexec_cmd(2, c, rank_hosts=[0, 1]), env=env)
            calib.setdefault("links", {})[f"netbed-{rate}"] = lk
            cal.save(path, calib)
            print(f"  link {rate}: {lk}", flush=True)
            points = [{**_point(f"3 hosts, {rate}", S, R, P, n), "link": rate}
                      for S, R, P, n in BED]
            for _ in range(repeats):
                for row in points:
                    S, R, P, n = row["S"], row["R"], row["P"], row["n"]
                    ranks = 1 + S + R * P
                    hosts = [0] * (1 + S) + [1 + r % 2 for r in range(R) for _ in range(P)]
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "run"
                        cmd = [PY, "-m", "mpi4py", "-m", "dbmpi", "train", cfg]
                        for o in [*overrides(data, S, R, P, n, steps),
                                  f"run.dir={json.dumps(str(out))}"]:
                            cmd += ["--set", o]

                        def job(cmd=cmd, out=out, ranks=ranks, hosts=hosts):
                            pr = bed.run(bed.mpiexec_cmd(ranks, cmd, rank_hosts=hosts),
                                         timeout=300, env=env, capture_output=True, text=True)
                            if pr.returncode:
                                raise SystemExit(f"plan.py: bed job failed: {pr.stderr[-1500:]}")
                            return [json.loads(x)
                                    for x in (out / "metrics.jsonl").read_text().splitlines()]
                        recs, load, bg, steal = run_probed(row, job)
                    _measure(row, recs, load, bg, steal)
            rows += points
    return rows


def predicted(calib: dict, row: dict) -> None:
    """Fill in the model's figures for a measured row (medians over its runs)."""
    link = None
    if "link" in row:
        link = Link.of(calib["links"][f"netbed-{row['link']}"], calib["tcp_cpu_s_per_byte"])
    args = (calib, row["S"], row["R"], row["P"], row["n"])
    kw = {"hosts": 3, "link": link} if link else {}
    p = predict(*args, **kw)
    bg, steal = statistics.median(row["others"]), statistics.median(row["steals"])
    # each run against the model given what the machine gave that run (steal varied from
    # 0.01 to 0.54 between the runs of one point)
    by_run = [predict(*args, **kw, background=o, steal=st).samples_per_s / got
              for got, o, st in zip(row["runs"], row["others"], row["steals"])]
    row.update(predicted=p.samples_per_s, measured=statistics.median(row["runs"]),
               spread=(max(row["runs"]) - min(row["runs"])) / statistics.median(row["runs"]),
               predicted_with_others=predict(*args, **kw, background=bg,
                                             steal=steal).samples_per_s,
               predicted_breakdown=p.breakdown, bottleneck=p.bottleneck,
               load_before=statistics.median(row["loads"]), background_cores=bg, steal=steal)
    row["ratio"] = row["predicted"] / row["measured"]
    row["ratios_by_run"] = by_run
    row["ratio_with_others"] = statistics.median(by_run)
    # given the pace the step probe saw around each run (steal included in it)
    ref, rates = calib.get("step_rate_reference"), row.get("step_rates")
    if ref and rates:
        row["paces"] = [r / ref for r in rates]
        row["ratios_given_pace"] = [
            predict(*args, **kw, background=o, pace=pace).samples_per_s / got
            for got, o, pace in zip(row["runs"], row["others"], row["paces"])]
        row["ratio_given_pace"] = statistics.median(row["ratios_given_pace"])


def _ok(ratio: float) -> str:
    return "yes" if abs(ratio - 1) <= 0.2 else "NO"


def top_choice(rows: list[dict]) -> dict:
    """The planner's pick among the measured points against the best measured one."""
    pick = max(rows, key=lambda r: (r["predicted"], -(1 + r["S"] + r["R"] * r["P"])))
    best = max(rows, key=lambda r: r["measured"])
    return {"pick": {k: pick[k] for k in ("S", "R", "P", "n")},
            "best": {k: best[k] for k in ("S", "R", "P", "n")},
            "pick_measured_vs_best": pick["measured"] / best["measured"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="steps per replica (default 300)")
    ap.add_argument("--links", nargs="+", default=["1gbit", "10gbit"],
                    help="bed link rates (tc tbf; default 1gbit 10gbit)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["one-node", "bed"],
                    help="parts to leave out")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each point, interleaved; the median counts (default 3)")
    ap.add_argument("--table", metavar="JSON",
                    help="only print the table of an earlier run's JSON, with this model")
    args = ap.parse_args()
    if args.table:
        old = json.loads(Path(args.table).read_text())
        if old["calibration"].get("version", 0) < cal.VERSION:
            sys.exit(f"{args.table}: a calibration of version {old['calibration'].get('version')}"
                     f" (the model reads version {cal.VERSION}): run the benchmark again")
        report(old["rows"], old["calibration"], f"{old['steps']} steps per replica, "
               f"from {args.table}; load average {old['load_before'][0]:.2f} -> "
               f"{old['load_after'][0]:.2f}")
        return
    load0 = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dbmpi-plan-") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        cfg = tmp / "plan.toml"
        cfg.write_text(CONFIG)
        path = tmp / "calibration.json"
        wait_quiet()
        calib = cal.calibrate(path, SHAPE, LAYERS, CLASSES, "softmax", BATCH, machine_again=True,
                              data_path=str(data), shuffle_buffer=4096)
        print(f"calibrated: {json.dumps(calib['machine'])}", flush=True)
        sig = cal.signature(SHAPE, LAYERS, CLASSES, "softmax", BATCH)
        layer_runs = [calib["layers"][sig]]
        # the pace the layer times stand for: the step probe right after each calibration,
        # steal-free as the calibration stores its times
        refs = [reference_rate()]

        def remeasure():
            wait_quiet()
            again = cal.calibrate(path, SHAPE, LAYERS, CLASSES, "softmax", BATCH,
                                  data_path=str(data), shuffle_buffer=4096)
            layer_runs.append(again["layers"][sig])
            refs.append(reference_rate())

        rows = [] if "one-node" in args.skip else one_node(str(cfg), data, args.steps,
                                                           args.repeats, remeasure)
        # the layers' times: per layer, the median of the calibrations between the rounds
        calib["layers"][sig] = {
            "batch": BATCH,
            "seconds": [statistics.median(r["seconds"][i] for r in layer_runs)
                        for i in range(len(layer_runs[0]["seconds"]))],
            "reader_s": statistics.median(r["reader_s"] for r in layer_runs),
            "co_run": statistics.median(r["co_run"] for r in layer_runs),
            "exchange_msg_s": statistics.median(r["exchange_msg_s"] for r in layer_runs),
            "calibrations": len(layer_runs), "each": layer_runs}
        calib["step_rate_reference"] = statistics.median(refs)
        calib["step_rate_references"] = refs
        if "bed" not in args.skip:
            rows += bed_points(calib, str(cfg), data, args.steps, args.links, path,
                               args.repeats)
    report(rows, calib, f"{args.steps} steps per replica, {args.repeats} runs per point; "
                        f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    write_json("plan", {"machine": machine_info(), "calibration": calib, "load_before": load0,
                        "load_after": os.getloadavg(), "steps": args.steps, "rows": rows,
                        "top_choice": {w: top_choice([r for r in rows if r["where"] == w])
                                       for w in sorted({r["where"] for r in rows})},
                        "seconds": round(time.time() - t0, 1)})


def report(rows: list[dict], calib: dict, title: str) -> None:
    """Predict every measured row and print the table and the planner's top choices."""
    for r in rows:
        predicted(calib, r)
    def given_pace(r: dict, what: str):
        if "ratio_given_pace" not in r:
            return "-"
        if what == "pace":
            return round(statistics.median(r["paces"]), 2)
        return round(r["ratio_given_pace"], 3) if what == "ratio" else _ok(r["ratio_given_pace"])

    table = [[r["where"], r["S"], r["R"], r["P"], r["n"], round(r["predicted"]),
              round(r["measured"]), round(r["spread"], 2), round(r["ratio"], 3),
              round(r["ratio_with_others"], 3), _ok(r["ratio_with_others"]),
              given_pace(r, "ratio"), given_pace(r, "ok"), r["bottleneck"],
              round(r["load_before"], 2), round(r["background_cores"], 2),
              round(r["steal"], 2), given_pace(r, "pace")] for r in rows]
    print_table(["where", "S", "R", "P", "n", "predicted samples/s (idle machine)",
                 "measured (median)", "spread", "ratio (idle)",
                 "ratio given steal (median by run)", "within 20%",
                 "ratio given pace (median by run)", "within 20%", "predicted bottleneck",
                 "load", "others' cores", "steal (median)", "pace (median)"], table,
                title=f"784-1024-1024-10 MLP, batch {BATCH}, {title}")
    for where in sorted({r["where"] for r in rows}):
        c = top_choice([r for r in rows if r["where"] == where])
        print(f"{where}: planner picks {c['pick']}, best measured {c['best']}, picked/best "
              f"measured = {c['pick_measured_vs_best']:.3f}")


if __name__ == "__main__":
    main()
