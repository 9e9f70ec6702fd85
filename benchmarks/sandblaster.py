"""Sandblaster L-BFGS: stragglers (portions and backup tasks), and real data vs one process.

Part ``straggler``: batch time (wall time of one function evaluation over the batch, the
first evaluation of each run left out) with one replica slowed 5x, with portions and backup
tasks, without backups, and without load balancing (one portion per replica), against the
same job without a straggler. The machine has 2 cores, fewer than the replicas, so every
replica also runs ``slowdown`` times slower than it could (it sleeps, see
``sandblaster.slowdown``): R replicas then need R / slowdown cores, which emulates one
dedicated core per replica, as on a cluster. ``--raw`` adds the same rows without that
emulation (replicas share the 2 cores, and a sleeping straggler frees its share for the
others). Runs are interleaved (A B C ... A B C) so drift hits every setting alike.

Part ``real``: Fashion-MNIST (a subset, ``train_limit``), Sandblaster with S shards and R
replicas against a single-process L-BFGS on the same objective: dbmpi.optim.lbfgs on local
numpy vectors (the same algorithm, one process) and scipy.optimize's L-BFGS-B (another
implementation, same history size), for the same number of iterations.

    python benchmarks/sandblaster.py                     # both parts (about 10 minutes here)
    python benchmarks/sandblaster.py --part straggler --repeats 3 --raw
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_threads, machine_info, print_table, run_worker, write_json
from _jobs import launch

CONFIG = "jobs/configs/sandblaster_fmnist.toml"


# -- jobs ------------------------------------------------------------------------------------
def run_job(config: str, overrides: list[str], run_dir: Path) -> dict:
    """One training job through ``dbmpi launch``, single-threaded ranks; its summary and
    metrics."""
    job = launch(config, overrides, run_dir, timeout=900, threads=1)
    return {"summary": job["summary"], "records": job["records"], "job_wall_s": job["wall_s"]}


def batch_times(result: dict) -> list[float]:
    """Wall time of every evaluation but the first (which also pays for start-up)."""
    evals = [r for r in result["records"] if r["kind"] == "batch"]
    return [r["wall_s"] for r in sorted(evals, key=lambda r: r["eval"])[1:]]


def losses(result: dict) -> list[float]:
    return [r["loss"] for r in result["records"] if r["kind"] == "lbfgs"]


# -- part 1: stragglers ----------------------------------------------------------------------
def straggler_settings(replicas: int, n: int, portion: int) -> dict[str, list[str]]:
    s = "sandblaster."
    return {
        "no straggler, portions + backups": [f"{s}straggler_replica=-1", f"{s}backups=true"],
        "straggler 5x, portions + backups": [f"{s}straggler_replica=0", f"{s}backups=true"],
        "straggler 5x, portions, no backups": [f"{s}straggler_replica=0", f"{s}backups=false"],
        "no straggler, portions, no backups": [f"{s}straggler_replica=-1", f"{s}backups=false"],
        "straggler 5x, 1 portion per replica": [
            f"{s}straggler_replica=0", f"{s}backups=false",
            f"{s}portion_size={-(-n // replicas)}", f"{s}iterations=2"],  # slow: fewer
    }


def straggler_part(args) -> dict:
    n, R, portion = args.examples, args.replicas, args.portion
    modes = {"emulated": args.slowdown}
    if args.raw:
        modes["raw"] = 1.0
    out = {}
    for mode, slowdown in modes.items():
        base = [f"topology.replicas={R}", f"topology.shards={args.shards}",
                f"sandblaster.train_limit={n}", f"sandblaster.portion_size={portion}",
                f"sandblaster.iterations={args.iterations}", "sandblaster.straggler_factor=5.0",
                f"sandblaster.slowdown={slowdown}", "sandblaster.push_every=4"]
        settings = straggler_settings(R, n, portion)
        runs = {name: [] for name in settings}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                for i, (name, extra) in enumerate(settings.items()):
                    res = run_job(args.config, base + extra, Path(tmp) / f"{mode}-{rep}-{i}")
                    runs[name].append(res)
                    print(f"  {mode} repeat {rep}: {name}: mean batch "
                          f"{statistics.mean(batch_times(res)):.3f} s", flush=True)
        ref_name = next(iter(settings))
        ref = statistics.median(t for r in runs[ref_name] for t in batch_times(r))
        ref_mean = statistics.mean(t for r in runs[ref_name] for t in batch_times(r))
        ref_losses = losses(runs[ref_name][0])
        rows, table = [], {}
        for name, results in runs.items():
            times = [t for r in results for t in batch_times(r)]
            med, mean = statistics.median(times), statistics.mean(times)
            evals = [e for r in results for e in sorted(
                (e for e in r["records"] if e["kind"] == "batch"), key=lambda e: e["eval"])[1:]]
            share = (sum(e["granted_by_replica"][0] for e in evals)
                     / max(1, sum(e["portions"] for e in evals)))
            loss_dev = max(abs(a - b) / abs(b) for r in results
                           for a, b in zip(losses(r), ref_losses))
            table[name] = {"median_batch_s": med, "mean_batch_s": mean,
                           "ratio_median": med / ref, "ratio_mean": mean / ref_mean,
                           "evaluations": len(times),
                           "backups_per_batch": statistics.mean(e["backups"] for e in evals),
                           "discarded_per_batch": statistics.mean(e["duplicates"] for e in evals),
                           "straggler_share": share, "max_loss_rel_dev": loss_dev,
                           "per_run_median_s": [statistics.median(batch_times(r))
                                                for r in results],
                           "batch_times_s": times}
            rows.append([name, len(times), med, f"{med / ref:.2f}x", mean,
                         f"{mean / ref_mean:.2f}x", f"{share:.3f}",
                         f"{table[name]['backups_per_batch']:.1f}",
                         f"{table[name]['discarded_per_batch']:.1f}", f"{loss_dev:.0e}"])
        how = (f"slowdown {slowdown}: one core per replica emulated" if slowdown > 1
               else "replicas share the cores")
        title = (f"Sandblaster batch time, {mode} ({how}): "
                 f"{n} Fashion-MNIST examples, portions of {portion}, S={args.shards}, R={R}, "
                 f"{args.repeats} runs x {args.iterations} iterations each, {os.cpu_count()} cores")
        text = print_table(["setting", "batches", "median batch (s)", "ratio", "mean (s)",
                            "ratio", "straggler's share", "backups/batch", "discarded/batch",
                            "loss dev."], rows, title=title)
        out[mode] = {"slowdown": slowdown, "table": table, "text": text,
                     "overrides": base}
    return out


# -- part 2: real data -----------------------------------------------------------------------
def serial_worker(args) -> None:
    """One process: dbmpi.optim.lbfgs on numpy vectors, then scipy's L-BFGS-B."""
    check_threads(args.threads)
    import numpy as np
    from scipy.optimize import minimize

    from dbmpi import config as config_mod
    from dbmpi.data import open_dataset
    from dbmpi.optim.lbfgs import GW, LBFGS, NumpySpace, W, X, num_vectors
    from dbmpi.train.sandblaster import build_model

    cfg = config_mod.load(args.config, args.set)
    sb = cfg.sandblaster
    ds = open_dataset(cfg.data.path)
    x, y = ds.load("train", limit=sb.train_limit or None)
    model = build_model(cfg, ds)
    x0 = model.init_params(cfg.run.seed).astype(np.float64).copy()

    def fg(p):
        model.params[:] = p
        loss, _ = model.forward_backward(x, y)
        return loss + 0.5 * sb.l2 * (p @ p), model.grads + sb.l2 * p

    class Objective:
        def begin_iteration(self, i):
            return False

        def evaluate(self, dots):
            f, g = fg(space.v[W])
            space.v[GW][:] = g
            return f, space.dots(dots)

    space = NumpySpace.zeros(num_vectors(sb.history), x0.size)
    space.v[X][:] = x0
    t0 = time.perf_counter()
    opt = LBFGS(space, Objective(), sb.history, sb.line_search, sb.c1, sb.c2, sb.max_evals,
                sb.gtol)
    ours = [opt.start()]
    evals = 1
    for _ in range(sb.iterations):
        rec = opt.step()
        evals += rec.evals
        if rec.stalled:
            break
        ours.append(rec.loss)
    ours_s = time.perf_counter() - t0
    x_ours = space.v[X].copy()
    seen = []

    def callback(intermediate_result):
        seen.append(float(intermediate_result.fun))

    t0 = time.perf_counter()
    res = minimize(fg, x0, jac=True, method="L-BFGS-B", callback=callback,
                   options={"maxcor": sb.history, "maxiter": sb.iterations, "gtol": 0,
                            "ftol": 0, "maxfun": 10 * sb.iterations})
    scipy_s = time.perf_counter() - t0
    xt, yt = ds.load(cfg.data.eval_split)
    model.params[:] = x_ours
    acc_ours = model.evaluate(xt, yt)[1]
    model.params[:] = res.x
    acc_scipy = model.evaluate(xt, yt)[1]
    print(json.dumps({"ours": ours, "ours_s": ours_s, "ours_evals": evals,
                      "ours_test_accuracy": acc_ours, "scipy": [ours[0]] + seen,
                      "scipy_s": scipy_s, "scipy_evals": int(res.nfev),
                      "scipy_test_accuracy": acc_scipy, "scipy_message": str(res.message)}))


def real_part(args) -> dict:
    overrides = [f"sandblaster.iterations={args.real_iterations}"]
    with tempfile.TemporaryDirectory() as tmp:
        dist = run_job(args.config, overrides, Path(tmp) / "real")
    sets = [item for o in overrides for item in ("--set", o)]
    serial = run_worker(__file__, 1, ["--config", args.config, *sets], timeout=3600)
    sb = losses(dist)
    ours, sp = serial["ours"], serial["scipy"]
    rows = []
    k = len(sb) - 1
    for it in sorted({0, 1, 2, 5, 10, 20, 30, 40, k} & set(range(k + 1))):
        rows.append([it, f"{sb[it]:.6f}", f"{ours[it]:.6f}" if it < len(ours) else "",
                     f"{sp[it]:.6f}" if it < len(sp) else "",
                     f"{abs(sb[it] - ours[it]) / abs(ours[it]):.1e}" if it < len(ours) else ""])
    s = dist["summary"]
    rows.append(["test accuracy", s["final_test_accuracy"], serial["ours_test_accuracy"],
                 serial["scipy_test_accuracy"], ""])
    rows.append(["evaluations", s["evaluations"], serial["ours_evals"],
                 serial["scipy_evals"], ""])
    rows.append(["wall time (s)", s["wall_s"], serial["ours_s"], serial["scipy_s"], ""])
    topo = s["topology"]
    text = print_table(
        ["iteration", f"Sandblaster S={topo['shards']} R={topo['replicas']}",
         "1 process, dbmpi L-BFGS", "1 process, scipy L-BFGS-B", "rel. diff (first two)"],
        rows, title=f"Training loss on Fashion-MNIST ({args.config}, "
                    f"{args.real_iterations} iterations)")
    return {"sandblaster_losses": sb, "serial": serial, "summary": s, "text": text,
            "final_rel_diff_vs_one_process": abs(sb[-1] - ours[-1]) / abs(ours[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--part", choices=["straggler", "real", "all"], default="all")
    ap.add_argument("--replicas", type=int, default=6)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--examples", type=int, default=12000)
    ap.add_argument("--portion", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--slowdown", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--raw", action="store_true", help="also run without the core emulation")
    ap.add_argument("--real-iterations", type=int, default=50)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serial_worker(args)
        return
    payload = {"machine": machine_info(), "config": args.config, "args": vars(args),
               "load_average_before": os.getloadavg()}
    if args.part in ("straggler", "all"):
        payload["straggler"] = straggler_part(args)
    if args.part in ("real", "all"):
        payload["real"] = real_part(args)
    payload["load_average_after"] = os.getloadavg()
    write_json("sandblaster", payload)


if __name__ == "__main__":
    main()
