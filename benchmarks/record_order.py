"""What recording a run's order costs (``run.record_order``), and what a replay takes.

Downpour on the plan benchmark's model (784-1024-1024-10 ReLU MLP, 1.86M parameters, batch
128, Adagrad, synthetic 28x28 images), 2 shards and R replicas, ``--steps`` steps per replica,
with and without ``run.record_order``, runs interleaved ``--repeats`` times. Reports the
samples/s of each (median of its steady 50-step windows, summed over replicas), their ratio,
and for every recorded run ``python -m dbmpi replay`` against it: its wall time and whether
the parameters came out equal bit for bit.

    python benchmarks/record_order.py [--replicas 1 2 3] [--steps 300] [--repeats 3]

Prints the table and writes ``benchmarks/results/record_order.json``.
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
from _jobs import launch  # noqa: E402
from plan import CONFIG, make_data, measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = {(R, rec): [] for R in args.replicas for rec in (False, True)}
    replays = {R: [] for R in args.replicas}
    with tempfile.TemporaryDirectory(prefix="dbmpi-record-") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        cfg = tmp / "job.toml"
        cfg.write_text(CONFIG)
        for k in range(args.repeats):
            for R in args.replicas:
                for rec in (False, True):
                    run = tmp / f"run-{R}-{int(rec)}-{k}"
                    out = launch(str(cfg), [f"data.path={json.dumps(str(data))}",
                                            "topology.shards=2", f"topology.replicas={R}",
                                            f"downpour.steps={args.steps}",
                                            f"run.record_order={str(rec).lower()}"],
                                 run, threads=1, timeout=600)
                    got, _ = measured(out["records"], R)
                    rows[R, rec].append(got)
                    print(f"  R={R} record={rec}: {got:.0f} samples/s", flush=True)
                    if rec:
                        t0 = time.perf_counter()
                        p = subprocess.run([sys.executable, "-m", "dbmpi", "replay", str(run)],
                                           cwd=ROOT, capture_output=True, text=True,
                                           env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                                           timeout=1200)
                        replays[R].append({"wall_s": time.perf_counter() - t0,
                                           "job_wall_s": out["summary"]["wall_s"],
                                           "equal": p.returncode == 0 and "bit for bit" in p.stdout,
                                           "line": (p.stdout or p.stderr).strip()})
                        print(f"    replay: {replays[R][-1]}", flush=True)
    load1 = os.getloadavg()
    table, results = [], []
    for R in args.replicas:
        off, on = statistics.median(rows[R, False]), statistics.median(rows[R, True])
        rp = replays[R]
        row = {"replicas": R, "samples_per_s_off": off, "samples_per_s_on": on,
               "on_over_off": on / off, "runs_off": rows[R, False], "runs_on": rows[R, True],
               "replay_wall_s": statistics.median(r["wall_s"] for r in rp),
               "job_wall_s": statistics.median(r["job_wall_s"] for r in rp),
               "replays_equal": sum(r["equal"] for r in rp), "replays": len(rp)}
        results.append(row)
        table.append([R, round(off), round(on), round(on / off, 3),
                      round(row["job_wall_s"], 1), round(row["replay_wall_s"], 1),
                      f"{row['replays_equal']}/{row['replays']}"])
    print_table(["replicas", "samples/s, off", "samples/s, recorded", "recorded / off",
                 "job wall s", "replay wall s", "replays bit-equal"], table,
                title=f"2 shards, {args.steps} steps per replica, median of {args.repeats} "
                      f"interleaved runs; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    write_json("record_order", {"machine": machine_info(), "load_before": load0,
                                "load_after": load1, "steps": args.steps, "rows": results,
                                "replays": {str(k): v for k, v in replays.items()}})


if __name__ == "__main__":
    main()
