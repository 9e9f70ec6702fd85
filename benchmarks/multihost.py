"""The parameter server and Downpour across hosts over TCP, on namespace hosts (tests/netbed.py).

For each link (veth unshaped, ``tc tbf`` 10gbit, 1gbit) on a bed of 3 hosts:

1. **PS path** (``_ps_bandwidth.py``): the coordinator and one shard on host 0, the worker on
   host 1. Fetch and push of ``--params`` floats against two-sided ``Send``/``Recv`` of the same
   bytes on the same link (the ratio the issue asks for: goal >= 0.8) and against raw one-sided
   ``Get``/``Put``; and the time from a push's start to its application on the shard while the
   worker computes 0, 50 and 200 ms without calling MPI (goal: independent of the compute).
2. **Downpour** (the demo model, ``jobs/configs/demo.toml``): the coordinator and 2 shards on
   host 0, replica 0 on host 1, replica 1 on host 2, against the same job with every rank on
   host 0 (one node: MPICH shared memory); replica samples/s as a ratio, with the fractions of
   step time in fetch, push and control reads.

    python benchmarks/multihost.py [--links none 10gbit 1gbit] [--params 2000000] [--steps 600]

Needs root (network namespaces). Prints one table and writes
``benchmarks/results/multihost.json``. This machine has 2 cores: every rank of a bed shares
them, so the figures are those of an oversubscribed node, not of a cluster's network.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ROOT, machine_info, print_table, write_json  # noqa: E402

from tests.netbed import YIELD_ENV, Bed, unavailable  # noqa: E402

PY = sys.executable


def ps_path(bed: Bed, params: int, repeats: int, timeout: float) -> dict:
    argv = bed.mpiexec_cmd(3, [PY, "-m", "mpi4py", str(ROOT / "benchmarks" / "_ps_bandwidth.py"),
                               "--params", str(params), "--shards", "1", "--repeats",
                               str(repeats), "--compute-ms", "0", "50", "200"],
                           rank_hosts=[0, 0, 1])
    p = bed.run(argv, timeout=timeout, env=_env(), capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"multihost.py: the PS benchmark failed (exit {p.returncode}):\n"
                         f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def downpour(bed: Bed, data: Path, rank_hosts: list[int], steps: int, out: Path,
             timeout: float) -> dict:
    cfg = ROOT / "jobs" / "configs" / "demo.toml"
    sets = [f"data.path={json.dumps(str(data))}", f"downpour.steps={steps}",
            "downpour.warm_start_steps=0", "downpour.eval_every_s=1000",
            "checkpoint.every_s=0", f"run.dir={json.dumps(str(out))}"]
    cmd = [PY, "-m", "mpi4py", "-m", "dbmpi", "train", str(cfg)]
    for s in sets:
        cmd += ["--set", s]
    p = bed.run(bed.mpiexec_cmd(5, cmd, rank_hosts=rank_hosts), timeout=timeout, env=_env(),
                capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"multihost.py: the Downpour job failed (exit {p.returncode}):\n"
                         f"{p.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    firsts = {min(r["step"] for r in train if r["replica"] == k) for k in (0, 1)}
    steady = [r for r in train if r["step"] not in firsts]  # the first window holds start-up
    med = {k: statistics.median(r[k] for r in steady)
           for k in ("samples_per_s", "fetch_fraction", "push_fraction", "ctrl_fraction")}
    med["records"] = len(steady)
    return med


def _env() -> dict:
    env = {**os.environ, **YIELD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def make_data(root: Path) -> Path:
    idx, shards = root / "idx", root / "shards"
    for argv in (["synth", "--out", str(idx), "--train", "12000", "--test", "2000"],
                 ["shard", "idx", "--src", str(idx), "--out", str(shards), "--shards", "4"]):
        subprocess.run([PY, "-m", "data_tools", *argv], check=True, cwd=ROOT, env=_env(),
                       stdout=subprocess.DEVNULL)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", nargs="+", default=["none", "10gbit", "1gbit"],
                    help="link rates to measure (tc tbf; none = veth unshaped)")
    ap.add_argument("--params", type=int, default=2_000_000,
                    help="floats fetched and pushed in the PS benchmark (default 2,000,000)")
    ap.add_argument("--repeats", type=int, default=7, help="PS repeats per figure (default 7)")
    ap.add_argument("--steps", type=int, default=600,
                    help="Downpour steps per replica (default 600)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per job (default 900)")
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"multihost.py: error: no network namespaces here: {why}")
    load0 = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dbmpi-multihost-") as tmp:
        data = make_data(Path(tmp))
        for link in args.links:
            with Bed(3, name="bench", rate=None if link == "none" else link) as bed:
                t = time.time()
                ps = ps_path(bed, args.params, args.repeats, args.timeout)
                one = downpour(bed, data, [0] * 5, args.steps, Path(tmp) / f"one-{link}",
                               args.timeout)
                multi = downpour(bed, data, [0, 0, 0, 1, 2], args.steps,
                                 Path(tmp) / f"multi-{link}", args.timeout)
                rows[link] = {"ps": ps, "one_node": one, "multi_host": multi,
                              "samples_per_s_ratio": multi["samples_per_s"]
                              / one["samples_per_s"], "seconds": round(time.time() - t, 1)}
    out = {"machine": machine_info(), "load_before": load0, "load_after": os.getloadavg()[0],
           "params": args.params, "steps": args.steps, "links": rows}
    table = []
    for link, r in rows.items():
        ps, sec, m = r["ps"], r["ps"]["seconds"], r["multi_host"]
        lat = ps["apply_latency_s"]
        table.append([link, ps["fetch_vs_raw_recv"], ps["push_post_vs_raw_send"],
                      ps["fetch_vs_raw_get"], sec["raw_put"] / sec["push_post"],
                      ps["GB_per_s"]["fetch"],
                      " / ".join(f"{1e3 * lat[k]:.1f}" for k in ("0.0", "50.0", "200.0")),
                      round(m["samples_per_s"]), round(r["one_node"]["samples_per_s"]),
                      r["samples_per_s_ratio"],
                      f"{m['fetch_fraction']:.2f} / {m['push_fraction']:.2f} / "
                      f"{m['ctrl_fraction']:.3f}"])
    print_table(["link", "fetch/Recv", "push/Send", "fetch/Get", "push/Put", "fetch GB/s",
                 "apply ms (0/50/200 ms compute)", "samples/s 3 hosts", "1 host", "ratio",
                 "fetch/push/ctrl"], table,
                title=f"PS: {args.params:,} floats, shard on host 0, worker on host 1. "
                      f"Downpour: demo model, 2 shards + 2 replicas on 3 hosts vs 1 host, "
                      f"{args.steps} steps each. Load {load0:.1f} -> {out['load_after']:.1f}")
    write_json("multihost", out)

if __name__ == "__main__":
    main()
