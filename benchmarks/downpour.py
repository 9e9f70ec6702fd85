"""Downpour at full speed: three tables from one command, written to benchmarks/results/.

1. PS path: fetch and push through the shards (1 worker, S shards, the acoustic model's 41.8M
   parameters) as a ratio to raw one-sided Get / Accumulate of the same bytes on the same
   windows (Win.Allocate, Lock_all(MODE_NOCHECK) + Flush), medians of interleaved repeats.
2. Replica scaling: samples/s of R = 1 and 2 replicas (single-threaded ranks) of the
   440-2000x4-8000 model on random data, n_fetch = n_push = 1 and 4; the fraction of step time
   spent in fetch and in push; the staleness distribution.
3. Time to accuracy on Fashion-MNIST (784-512-256-10 ReLU MLP, batch 64 per replica): wall
   time until the test accuracy first reaches the target, for Downpour + Adagrad with 1 and 2
   replicas, and PyTorch DDP (gloo, 2 processes x 1 thread, the same MLP, data and batch per
   process) with each of a few optimizers (the best one counts). Each system runs
   ``--repeats`` times, interleaved; the table gives the median (the number of samples an
   asynchronous run needs to reach the target varies from run to run).

    python benchmarks/downpour.py --fmnist data/fmnist --fmnist-idx DIR
    python benchmarks/downpour.py --quick        # small sizes, a smoke run

Table 3 needs Fashion-MNIST twice: as shards (--fmnist, made by ``python -m data_tools shard
idx``) and as the raw idx files for the PyTorch side (--fmnist-idx DIR, default
$DBMPI_DATA/fashion-mnist; from github.com/zalandoresearch/fashion-mnist, data/fashion/).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, data_source, machine_info, print_table, write_json
from _jobs import run_job

from dbmpi.launch import MPICH_YIELD, find_mpiexec

HERE = Path(__file__).resolve().parent


def ps_bandwidth(params: int, shards: int, repeats: int, shared: bool) -> dict:
    """``shared``: the on-node path (shards and workers read each other's windows with loads
    and stores); off, every transfer is an MPI Get, as between nodes."""
    env = {**os.environ, **MPICH_YIELD, "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "DBMPI_RMA_SHARED": "1" if shared else "0"}
    cmd = [find_mpiexec(), "-n", str(2 + shards), sys.executable, "-m", "mpi4py",
           str(HERE / "_ps_bandwidth.py"), "--params", str(params), "--shards", str(shards),
           "--repeats", str(repeats)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_random_data(out: Path, features: int, classes: int, n: int) -> Path:
    """Random features and labels in the shard format (throughput only: nothing to learn)."""
    from data_tools.shards import build_manifest, write_split

    rng = np.random.default_rng(0)
    for split, count, shards in (("train", n, 4), ("test", max(64, n // 8), 1)):
        x = rng.standard_normal((count, features), dtype=np.float32)
        y = rng.integers(0, classes, count)
        write_split(out, split, x, y, num_shards=shards, seed=0, num_classes=classes,
                    source="random", normalization="none",
                    command="benchmarks/downpour.py")
    build_manifest(out)
    return out


def scaling(data: Path, layers: str, batch: int, steps: int, replicas: list[int],
            cadences: list[int]) -> list[dict]:
    rows = []
    for cadence in cadences:
        for R in replicas:
            over = [f"data.path={json.dumps(str(data))}", f"topology.replicas={R}",
                    "topology.shards=2", f"model.layers={layers}", f"data.batch_size={batch}",
                    f"downpour.steps={steps}", "downpour.epochs=0", "downpour.warm_start_steps=0",
                    f"downpour.n_fetch={cadence}", f"downpour.n_push={cadence}",
                    "downpour.log_every=5", "downpour.eval_every_s=10000.0",
                    "data.eval_limit=64", "checkpoint.every_s=0",
                    "optimizer.learning_rate=0.001"]
            summary, recs = run_job("jobs/configs/demo.toml", over, threads=1)
            train = [r for r in recs if r["kind"] == "train"]
            per = []
            for rep in range(R):
                mine = [r for r in train if r["replica"] == rep][1:]  # drop start-up window
                per.append(statistics.median(r["samples_per_s"] for r in mine))
            stale = collections.Counter(s for r in recs if r["kind"] == "push"
                                        for s in r["staleness"] if s is not None)
            rows.append({
                "replicas": R, "n_fetch_push": cadence, "samples_per_s": sum(per),
                "per_replica": per,
                "fetch_fraction": statistics.median(r["fetch_fraction"] for r in train),
                "push_fraction": statistics.median(r["push_fraction"] for r in train),
                "staleness": dict(sorted(stale.items())),
                "params": summary["num_params"]})
            # the shards' CPU time applying pushes, per push (every shard applies its part of
            # each), and the cores that costs at this run's push rate
            shard_recs = [r for r in recs if r["kind"] == "shard"]
            per_push = (sum(r["busy_cpu_s"] for r in shard_recs)
                        / max(1, shard_recs[0]["pushes_applied"]))
            rows[-1]["shard_s_per_push"] = per_push
            rows[-1]["ps_cores"] = per_push * rows[-1]["samples_per_s"] / batch / cadence
    cores = os.cpu_count()
    for row in rows:
        one = next(r for r in rows if r["replicas"] == 1
                   and r["n_fetch_push"] == row["n_fetch_push"])
        row["speedup"] = row["samples_per_s"] / one["samples_per_s"]
        # What the cores allow when the parameter server shares them: each replica needs its
        # core plus the shard time its pushes cost (measured with one replica).
        row["cpu_ceiling"] = min(row["replicas"], cores / (1 + one["ps_cores"]))
    return rows


_GEMM = ("import numpy as np, time\n"
         "a = np.random.rand(128, 2000).astype(np.float32)\n"
         "b = np.random.rand(2000, 2000).astype(np.float32)\n"
         "a @ b\n"
         "t = time.perf_counter()\n"
         "for _ in range(150):\n"
         "    a @ b\n"
         "print(150 * 2 * 128 * 2000 * 2000 / (time.perf_counter() - t) / 1e9)\n")


def gemm_ceiling(procs: list[int]) -> dict:
    """GFLOP/s of k single-threaded sgemm processes running at once: what this machine's cores
    give independent compute-bound ranks (the ceiling for replica scaling)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = {}
    for k in procs:
        ps = [subprocess.Popen([sys.executable, "-c", _GEMM], stdout=subprocess.PIPE, text=True,
                               env=env) for _ in range(k)]
        out[k] = sum(float(p.communicate()[0]) for p in ps)
    return {"gflops": out, "speedup": {k: v / out[procs[0]] for k, v in out.items()}}


def time_to_accuracy_dbmpi(fmnist: Path, replicas: int, target: float, max_epochs: float) -> dict:
    # One shard: the MLP is 2.1 MB and a step ~2 ms, so on a 2-core machine every extra PS
    # process only adds wake-ups that preempt replicas (measured: 2 replicas reach the
    # target in ~0.6x the single-replica time with 1 shard, ~0.75x with 2).
    over = [f"data.path={json.dumps(str(fmnist))}", f"topology.replicas={replicas}",
            "topology.shards=1",
            # epochs count passes over a replica's own part of the data (1/R of it): the same
            # number for every R gives every system the same budget of samples in all
            "downpour.steps=0", f"downpour.epochs={max_epochs}",
            # The coordinator only records the parameters every 0.5 s; they are scored after
            # the run. DDP evaluates with its clock stopped; evaluating live here would take
            # 0.11 of the 2 cores from the replicas (measured), so neither side pays for it.
            "downpour.record_iterates=true", "downpour.eval_every_s=0.5",
            "checkpoint.every_s=0"]
    summary, recs = run_job("jobs/configs/fashion_mnist.toml", over, threads=1, iterates=True)
    evals = [r for r in recs if r["kind"] == "eval"]
    hit = next((r for r in evals if r["accuracy"] >= target), None)
    return {"system": f"dbmpi Downpour+Adagrad, {replicas} replica(s)",
            "seconds": hit["wall_s"] if hit else None,
            "best_accuracy": max(r["accuracy"] for r in evals),
            "samples": hit["step"] * 64 if hit else None, "run_s": summary["wall_s"]}


def time_to_accuracy_ddp(idx: Path, target: float, max_epochs: float, optim: str,
                         lr: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, str(HERE / "_ddp_fmnist.py"), "--src", str(idx), "--target",
               str(target), "--epochs", str(max_epochs), "--optim", optim, "--lr", str(lr),
               "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600,
                           check=False)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        res = json.loads(out.read_text())
    res["system"] = f"PyTorch DDP gloo 2x1 thread, {optim} lr {lr}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fmnist", default="data/fmnist", help="Fashion-MNIST shards (data_tools)")
    ap.add_argument("--fmnist-idx", default=None,
                    help="Fashion-MNIST idx files, for the PyTorch side of table 3 "
                    "(default $DBMPI_DATA/fashion-mnist)")
    ap.add_argument("--target", type=float, default=0.89)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ps", "scaling", "accuracy"])
    ap.add_argument("--repeats", type=int, default=3, help="time-to-accuracy runs per system")
    args = ap.parse_args()
    if "accuracy" not in args.skip:  # before the long parts: a missing data set stops at once
        args.fmnist_idx = data_source(args.fmnist_idx, "fashion-mnist",
                                      "Fashion-MNIST idx files", flag="--fmnist-idx")
    result = {"machine": machine_info()}

    if "ps" not in args.skip:
        n = 2_000_000 if args.quick else 41_777_152
        rows = []
        for shared, path in ((True, "on-node (shared memory)"), (False, "RMA (as across nodes)")):
            bw = ps_bandwidth(n, 2, 3 if args.quick else 7, shared)
            result["ps_bandwidth" if shared else "ps_bandwidth_rma"] = bw
            g = bw["GB_per_s"]
            rows += [
                [path, "fetch (Get)", f"{g['fetch']:.2f}", f"{g['raw_get']:.2f} (Get)",
                 f"{bw['fetch_vs_raw_get']:.2f}"],
                [path, "push, sustained (shards pull + Adagrad)", f"{g['push_inplace']:.2f}",
                 f"{g['raw_accumulate']:.2f} (Accumulate)",
                 f"{bw['push_inplace_vs_raw_accumulate']:.2f}"],
                [path, "push + copy from another array", f"{g['push']:.2f}",
                 f"{g['raw_accumulate']:.2f} (Accumulate)",
                 f"{bw['push_vs_raw_accumulate']:.2f}"],
                [path, "push, slot free (what a replica waits)", f"{g['push_post']:.2f}",
                 f"{g['raw_accumulate']:.2f} (Accumulate)",
                 f"{bw['push_post_vs_raw_accumulate']:.2f}"]]
        print_table(["transport", "path", "GB/s", "raw GB/s", "ratio (goal 0.80)"], rows,
                    title=f"1. PS path, {bw['bytes'] / 1e6:.0f} MB over {bw['shards']} shards")

    if "scaling" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            if args.quick:
                data = make_random_data(Path(tmp) / "rand", 440, 800, 2048)
                layers, batch, steps = "[{units=200},{units=200}]", 64, 20
            else:
                data = make_random_data(Path(tmp) / "rand", 440, 8000, 8192)
                layers = ",".join(["{units=2000, activation='relu'}"] * 4)
                layers, batch, steps = f"[{layers}]", 128, 80
            ceiling = gemm_ceiling([1, 2])
            rows = scaling(data, layers, batch, steps, [1, 2], [1, 4, 16])
        result["scaling"] = rows
        result["gemm_ceiling"] = ceiling
        print(f"machine ceiling: 2 single-threaded sgemm processes at once give "
              f"{ceiling['speedup'][2]:.2f}x the GFLOP/s of one alone "
              f"({ceiling['gflops'][1]:.0f} -> {ceiling['gflops'][2]:.0f} GFLOP/s)")
        print_table(["R", "n_fetch=n_push", "samples/s", "x one replica", "goal 0.9R",
                     "cores left by PS", "PS cores", "fetch frac", "push frac",
                     "staleness counts"],
                    [[r["replicas"], r["n_fetch_push"], f"{r['samples_per_s']:.0f}",
                      f"{r['speedup']:.2f}", f"{0.9 * r['replicas']:.1f}",
                      f"{r['cpu_ceiling']:.2f}", f"{r['ps_cores']:.2f}",
                      f"{r['fetch_fraction']:.3f}", f"{r['push_fraction']:.3f}",
                      " ".join(f"{k}:{v}" for k, v in r["staleness"].items())] for r in rows],
                    title=f"2. Replica scaling ({rows[0]['params']:,} parameters, 2 shards)")

    if "accuracy" not in args.skip:
        target = 0.80 if args.quick else args.target
        epochs = 2.0 if args.quick else 30.0
        ddp_opts = [("adagrad", 0.01)] if args.quick else [("adagrad", 0.01), ("adam", 0.001)]
        systems = [("dbmpi", 1), ("dbmpi", 2)] + [("ddp", o) for o in ddp_opts]
        trials: dict = {}
        for _ in range(1 if args.quick else args.repeats):  # interleaved: load hits all alike
            for kind, what in systems:
                run = (time_to_accuracy_dbmpi(Path(args.fmnist), what, target, epochs)
                       if kind == "dbmpi" else
                       time_to_accuracy_ddp(Path(args.fmnist_idx), target, epochs, *what))
                trials.setdefault(run["system"], []).append(run)
        runs = []
        for system, got in trials.items():
            secs = [r["seconds"] for r in got if r["seconds"]]
            runs.append({"system": system, "runs": got,
                         "seconds": statistics.median(secs) if len(secs) == len(got) else None,
                         "all_seconds": [r["seconds"] for r in got],
                         "best_accuracy": max(r["best_accuracy"] for r in got)})
        result["time_to_accuracy"] = runs
        one, two = runs[0]["seconds"], runs[1]["seconds"]
        best_ddp = min((r["seconds"] for r in runs[2:] if r["seconds"]), default=None)
        rows = [[r["system"], f"{r['seconds']:.1f}" if r["seconds"] else "not reached",
                 " ".join(f"{x:.1f}" if x else "-" for x in r["all_seconds"]),
                 f"{r['best_accuracy']:.4f}"] for r in runs]
        print_table(["system", f"median seconds to {target:.0%}", "each run",
                     "best accuracy"], rows, title="3. Time to accuracy, Fashion-MNIST")
        if one and two:
            print(f"2 replicas / 1 replica: {two / one:.2f} (goal <= 0.6)")
        if two and best_ddp:
            print(f"2 replicas / best DDP: {two / best_ddp:.2f} (goal <= 1.0)")
        result["ratios"] = {"two_vs_one": two / one if one and two else None,
                            "two_vs_best_ddp": two / best_ddp if two and best_ddp else None}
    name = "downpour" + ("_quick" if args.quick else "")
    previous = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if args.skip and previous.exists():  # a partial run updates the tables it measured
        result = {**json.loads(previous.read_text()), **result}
    write_json(name, result)


if __name__ == "__main__":
    main()
