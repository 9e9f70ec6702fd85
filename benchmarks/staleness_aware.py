"""The price of asynchrony, and staleness-aware steps (issue 23): samples and time to a test
accuracy on Fashion-MNIST for 1 replica, 2 replicas, and 2 replicas whose shards divide each
push's learning rate by its staleness (``downpour.staleness_aware``, Zhang et al. 2016).

Each of the three runs ``--repeats`` times, interleaved, in one invocation; the parameters are
recorded every 0.5 s and scored after each run (as ``benchmarks/downpour.py`` does), so
evaluating takes no core from the replicas. Samples to target = the steps of all replicas at
the first recorded point at or above the target, times the batch.

    python benchmarks/staleness_aware.py --fmnist data/fmnist --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json
from _jobs import run_job

CASES = [(1, False), (2, False), (2, True)]
BATCH = 64  # jobs/configs/fashion_mnist.toml


def to_target(fmnist: str, replicas: int, aware: bool, target: float, epochs: float) -> dict:
    over = [f"data.path={json.dumps(fmnist)}", f"topology.replicas={replicas}",
            "topology.shards=1", "downpour.steps=0", f"downpour.epochs={epochs}",
            f"downpour.staleness_aware={str(aware).lower()}",
            "downpour.record_iterates=true", "downpour.eval_every_s=0.5", "checkpoint.every_s=0"]
    summary, recs = run_job("jobs/configs/fashion_mnist.toml", over, threads=1, iterates=True)
    evals = [r for r in recs if r["kind"] == "eval"]
    hit = next((r for r in evals if r["accuracy"] >= target), None)
    return {"replicas": replicas, "aware": aware, "seconds": hit["wall_s"] if hit else None,
            "samples": hit["step"] * BATCH if hit else None,
            "best_accuracy": max(r["accuracy"] for r in evals), "run_s": summary["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmnist", default="data/fmnist", help="Fashion-MNIST shards (data_tools)")
    ap.add_argument("--target", type=float, default=0.89)
    ap.add_argument("--epochs", type=float, default=6.0, help="per replica, at most")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    runs = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for R, aware in CASES:  # interleaved: the machine's load hits every case alike
            runs[R, aware].append(to_target(args.fmnist, R, aware, args.target, args.epochs))
    one = runs[1, False]

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    rows, out = [], []
    s1, t1 = med(r["samples"] for r in one), med(r["seconds"] for r in one)
    for (R, aware), rs in runs.items():
        s, t = med(r["samples"] for r in rs), med(r["seconds"] for r in rs)
        reached = sum(r["samples"] is not None for r in rs)
        rows.append([R, "on" if aware else "off", f"{reached}/{len(rs)}",
                     s, round(s / s1, 3) if s and s1 else None,
                     round(t, 1) if t else None, round(t / t1, 3) if t and t1 else None,
                     " ".join(str(r["samples"]) for r in rs)])
        out.append({"replicas": R, "staleness_aware": aware, "runs": rs,
                    "median_samples": s, "median_seconds": t})
    print_table(["replicas", "staleness-aware", "reached", "median samples", "x 1 replica",
                 "median s", "x 1 replica", "samples, each run"], rows,
                title=f"to {args.target:.0%} test accuracy on Fashion-MNIST, {args.repeats} "
                      f"interleaved repeats (load {load:.1f} -> {os.getloadavg()[0]:.1f})")
    write_json("staleness_aware", {"machine": machine_info(), "args": vars(args),
                                   "load_before": load, "load_after": os.getloadavg()[0],
                                   "cases": out})


if __name__ == "__main__":
    main()
