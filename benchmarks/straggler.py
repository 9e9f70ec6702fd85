"""Downpour with a straggler: one replica slowed 5x, the others must keep their pace.

For R replicas, runs the same job twice in one invocation: without a straggler, and with
replica 0 sleeping so that each of its steps takes ``--factor`` times as long
(``downpour.straggler_*``, a benchmark-only knob). Throughput of each replica is the median of
its ``train`` records' samples/s while it ran. Goal (issue 7): the other replicas together keep
>= (R-1)/R of the whole job's throughput without a straggler, i.e. nobody waits for the slow one.

    python benchmarks/straggler.py --config jobs/configs/fashion_mnist.toml --replicas 2 3

``--max-staleness 0 1 4 16 -1`` (issue 23) runs the straggler job once per bound instead
(``downpour.max_staleness``; -1: none) and reports what the bound costs the others, and the
worst staleness of any push.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json
from _jobs import run_job


def throughput(records: list[dict], replicas: int) -> list[float]:
    out = []
    for r in range(replicas):
        rates = [x["samples_per_s"] for x in records if x["kind"] == "train" and x["replica"] == r]
        out.append(statistics.median(rates[1:] or rates))  # drop the first window (start-up)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/fashion_mnist.toml")
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--factor", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-staleness", type=int, nargs="+", default=None,
                    help="bounds to compare (-1: none); default: the straggler goal only")
    args = ap.parse_args()
    if args.max_staleness is not None:
        return bounds(args)
    rows, results = [], []
    for R in args.replicas:
        common = [f"topology.replicas={R}", f"downpour.steps={args.steps}", "downpour.epochs=0",
                  "downpour.warm_start_steps=0", "downpour.log_every=50",
                  "downpour.eval_every_s=1000.0", "checkpoint.every_s=0"]
        base = throughput(run_job(args.config, common)[1], R)
        slow = throughput(run_job(args.config, common + [
            "downpour.straggler_replica=0", f"downpour.straggler_factor={args.factor}"])[1], R)
        others_ratio = sum(slow[1:]) / sum(base)
        goal = (R - 1) / R
        results.append({"replicas": R, "factor": args.factor, "samples_per_s_no_straggler": base,
                        "samples_per_s_straggler": slow, "others_vs_whole_job": others_ratio,
                        "goal": goal, "met": others_ratio >= goal})
        rows.append([R, " ".join(f"{x:.0f}" for x in base), " ".join(f"{x:.0f}" for x in slow),
                     f"{sum(base):.0f}", f"{sum(slow[1:]):.0f}", f"{others_ratio:.2f}",
                     f"{goal:.2f}"])
    print_table(["R", "per replica, no straggler", f"per replica, replica 0 x{args.factor:g}",
                 "job total", "others' total", "others / job", "goal (R-1)/R"], rows,
                title=f"Downpour samples/s with a straggler ({args.config})")
    write_json("straggler", {"machine": machine_info(), "config": args.config,
                                    "results": results})


def bounds(args) -> None:
    """The straggler job once per staleness bound: the others' samples/s and the worst
    staleness, against the job without a straggler (and without a bound)."""
    rows, results = [], []
    for R in args.replicas:
        common = [f"topology.replicas={R}", f"downpour.steps={args.steps}", "downpour.epochs=0",
                  "downpour.warm_start_steps=0", "downpour.log_every=50",
                  "downpour.eval_every_s=1000.0", "checkpoint.every_s=0"]
        base = sum(throughput(run_job(args.config, common)[1], R))
        for s in args.max_staleness:
            _, recs = run_job(args.config, common + [
                "downpour.straggler_replica=0", f"downpour.straggler_factor={args.factor}",
                f"downpour.max_staleness={s}"])
            rates = throughput(recs, R)
            worst = max(max(r["staleness"]) for r in recs if r["kind"] == "push")
            waits = [r["bound_wait_s"] for r in recs if r["kind"] == "worker_done"]
            results.append({"replicas": R, "max_staleness": s, "samples_per_s": rates,
                            "no_straggler_total": base, "worst_staleness": worst,
                            "bound_wait_s": waits})
            rows.append([R, "off" if s < 0 else s, " ".join(f"{x:.0f}" for x in rates),
                         f"{sum(rates[1:]):.0f}", f"{sum(rates[1:]) / base:.2f}", worst])
    print_table(["R", "max_staleness", "per replica (replica 0 slow)", "others' total",
                 "others / job without straggler", "worst staleness"], rows,
                title=f"Bounded staleness with replica 0 x{args.factor:g} slower ({args.config})")
    write_json("staleness_bound", {"machine": machine_info(), "config": args.config,
                                   "factor": args.factor, "results": results})


if __name__ == "__main__":
    main()
