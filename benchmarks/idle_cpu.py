"""CPU time of waiting ranks when ranks outnumber cores (5 ranks on 2 cores by default).

Runs the same Downpour job twice, side by side in one invocation: once with the environment
``python -m dbmpi launch`` sets (MPICH told to yield while waiting), once with MPICH's defaults
(busy polling). Reports each rank's CPU time as a fraction of its wall time, from the
``summary.json`` each run writes, plus the job's wall time.

    python benchmarks/idle_cpu.py --config jobs/configs/demo.toml --set downpour.steps=3000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, print_table, write_json  # noqa: E402

from dbmpi import config as config_mod  # noqa: E402
from dbmpi.launch import MPICH_YIELD, command, find_mpiexec, launch_env  # noqa: E402


def run(cfg_path: str, overrides: list[str], yield_cpu: bool, run_dir: Path) -> dict:
    cfg = config_mod.load(cfg_path, overrides)
    n = cfg.topology.world_size
    base = {k: v for k, v in os.environ.items() if not k.startswith("MPIR_CVAR_")}
    env = launch_env(n, cfg.topology.replicas * cfg.topology.partitions, env=base)
    if not yield_cpu:
        for key in MPICH_YIELD:
            env.pop(key, None)
    cmd = command(cfg_path, [*overrides, f"run.dir={json.dumps(str(run_dir))}"], n,
                  find_mpiexec())
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "yield": run(args.config, args.overrides, True, Path(tmp) / "yield"),
            "default": run(args.config, args.overrides, False, Path(tmp) / "default"),
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
    path = write_json("idle_cpu", {"machine": machine_info(), "config": args.config,
                                   "overrides": args.overrides, "runs": results,
                                   "max_non_replica_cpu_fraction": max(idle)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
