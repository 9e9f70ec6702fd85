"""CPU time of waiting ranks when ranks outnumber cores (5 ranks on 2 cores by default).

Runs the same Downpour job twice, side by side in one invocation: once with the environment
``python -m dbmpi launch`` sets (MPICH told to yield while waiting), once with MPICH's defaults
(busy polling). Reports each rank's CPU time as a fraction of its wall time, from the
``summary.json`` each run writes, plus the job's wall time.

    python benchmarks/idle_cpu.py --config jobs/configs/demo.toml --set downpour.steps=3000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json
from _jobs import run_job


def run(cfg_path: str, overrides: list[str], yield_cpu: bool) -> dict:
    return run_job(cfg_path, overrides, yield_cpu)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    results = {
        "yield": run(args.config, args.overrides, True),
        "default": run(args.config, args.overrides, False),
    }
    rows = []
    for a, b in zip(results["yield"]["ranks"], results["default"]["ranks"]):
        rows.append([a["rank"], f"{a['role']} {a['index']}", f"{a['cpu_fraction']:.3f}",
                     f"{b['cpu_fraction']:.3f}"])
    rows.append(["", "job wall time (s)", f"{results['yield']['wall_s']:.1f}",
                 f"{results['default']['wall_s']:.1f}"])
    rows.append(["", "final test accuracy", f"{results['yield']['final_test_accuracy']:.4f}",
                 f"{results['default']['final_test_accuracy']:.4f}"])
    print_table(["rank", "role", "cpu/wall, dbmpi launch env", "cpu/wall, MPICH defaults"], rows,
                title=f"CPU time / wall time per rank: {len(rows) - 2} ranks on "
                      f"{os.cpu_count()} cores ({args.config} {' '.join(args.overrides)})")
    idle = [r["cpu_fraction"] for r in results["yield"]["ranks"] if r["role"] != "replica"]
    print(f"max CPU fraction of non-replica (waiting) ranks with dbmpi's settings: {max(idle):.3f}")
    write_json("idle_cpu", {"machine": machine_info(), "config": args.config,
                                   "overrides": args.overrides, "runs": results,
                                   "max_non_replica_cpu_fraction": max(idle)})


if __name__ == "__main__":
    main()
