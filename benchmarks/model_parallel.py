"""Model parallelism: time per minibatch (forward + backward) against the number of partitions P.

Two models, each a replica cut over P single-threaded MPI ranks (``mpiexec -n P``,
OPENBLAS/OMP/MKL_NUM_THREADS=1), float32:

* ``fc``: the paper's acoustic model, 440 -> 4 x 2560 sigmoid -> 8192 softmax (42M
  parameters), batch 256. Dense layers are split by output units: activations are
  all-gathered, input gradients reduce-scattered.
* ``lc``: a locally connected image model on 96 x 96 x 3 images, three stages of
  local filters (8x8 stride 2, 6x6 stride 2, 4x4 stride 1) + L2 pooling + LCN, then a
  10-way softmax (16M parameters), batch 32. Split by image rows: only halo rows cross.

Reference: the unpartitioned single-rank ``dbmpi.model.Model`` in its own process (speedup =
its time / the partitioned time). Each sample is the slowest partition's mean over a few
steps (a replica runs at the pace of its slowest partition); the runs for different P take
turns, round after round, so that drift from other jobs on the machine hits them alike, and
each run waits for idle cores first. The table reports the median and the best sample: the
machine is shared and other jobs only ever add time, so the best sample is the closest to an
idle machine. Bytes are the payload every partition sends to the others per step (forward
activations + backward gradients), counted by the exchange itself.

    python benchmarks/model_parallel.py                 # P = 1, 2 (and 4, 8 if the cores allow)
    python benchmarks/model_parallel.py --quick         # smoke run
    python benchmarks/model_parallel.py --partitions 1 2 3 4 --models lc
    python benchmarks/model_parallel.py --split rows    # local layers cut by whole rows
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

MODELS = {
    "fc": {
        "input": (440,),
        "layers": [{"type": "dense", "units": 2560, "activation": "sigmoid"}] * 4,
        "classes": 8192,
        "batch": 256,
        "what": "FC acoustic 440-2560x4-8192 (sigmoid, softmax), batch 256",
    },
    "lc": {
        "input": (96, 96, 3),
        "layers": [
            {"type": "local", "filters": 16, "kernel": 8, "stride": 2},
            {"type": "l2pool", "size": 3, "stride": 1},
            {"type": "lcn", "size": 5},
            {"type": "local", "filters": 32, "kernel": 6, "stride": 2},
            {"type": "l2pool", "size": 3, "stride": 1},
            {"type": "lcn", "size": 5},
            {"type": "local", "filters": 32, "kernel": 4, "stride": 1},
            {"type": "l2pool", "size": 2, "stride": 2},
            {"type": "lcn", "size": 3},
        ],
        "classes": 10,
        "batch": 32,
        "what": "locally connected 96x96x3: 3 x (local + L2 pool + LCN), 10-way, batch 32",
    },
}


# ---------------------------------------------------------------------------- worker (MPI)

def worker(model_name: str, single: bool, number: int, repeats: int, split: str = "rows") -> dict:
    import numpy as np
    from mpi4py import MPI

    from dbmpi.model import Model
    from dbmpi.model.parallel import PartitionedModel
    from dbmpi.model.partition import PartitionPlan

    C.check_threads(1)
    spec = MODELS[model_name]
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    shape, layers, classes, B = spec["input"], spec["layers"], spec["classes"], spec["batch"]
    if single:
        assert P == 1
        model = Model.from_spec(shape, layers, classes)
        model.init_params(0)
        plan = None
    else:
        plan = PartitionPlan(shape, layers, classes, P, split=split)
        model = PartitionedModel(plan, comm)
        model.init_params(0)
    rng = np.random.default_rng(0)
    x = rng.random((B, *shape), dtype=np.float32)
    y = rng.integers(0, classes, B)
    for _ in range(2):  # warm-up: buffers, page faults, BLAS
        model.forward_backward(x, y)
    if plan is not None:
        model.reset_stats()
    samples, losses = [], []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(number):
            loss, _ = model.forward_backward(x, y)
        dt = (time.perf_counter() - t0) / number
        samples.append(comm.allreduce(dt, op=MPI.MAX))
        losses.append(loss)
    out = {"P": P, "single": single, "samples_s": samples, "loss": losses[-1],
           "num_params": (plan.num_params if plan else model.num_params)}
    if plan is not None:
        steps = number * repeats
        st = model.stats()
        sent = comm.gather(st["bytes_sent"] / steps, root=0)
        waits = comm.gather(st["wait_s"] / steps, root=0)
        msgs = comm.gather(st["messages_sent"] / steps, root=0)
        out.update(bytes_per_step=sum(sent) if sent else 0,
                   bytes_per_step_planned=sum(plan.bytes_per_step(B)),
                   messages_per_step=sum(msgs) if msgs else 0,
                   wait_s_per_step=waits,
                   param_split=list(plan.param_sizes))
    return out


# ------------------------------------------------------------------------------ driver

def _idle_cores(interval: float = 0.5) -> float:
    """Cores idle over ``interval`` seconds (from /proc/stat; the machine is shared)."""
    def snap():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (without guest time)

    i0, t0 = snap()
    time.sleep(interval)
    i1, t1 = snap()
    return (i1 - i0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def _wait_quiet(min_idle: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until ``min_idle`` cores are idle; return the last reading."""
    t_end = time.time() + timeout
    while True:
        idle = _idle_cores()
        if idle >= min_idle or time.time() > t_end:
            return idle
        time.sleep(1.0)


def _launch(model: str, P: int, single: bool, number: int, repeats: int,
            split: str = "rows") -> dict:
    from dbmpi.launch import find_mpiexec, launch_env

    env = launch_env(P, P, C.thread_env(1))  # one BLAS thread; MPICH yields if P > cores
    cmd = [find_mpiexec(), "-n", str(P), sys.executable, "-m", "mpi4py", __file__, "--worker",
           "--model", model, "--number", str(number), "--repeats", str(repeats),
           "--split", split]
    if single:
        cmd.append("--single")
    p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round, few steps: a smoke run")
    ap.add_argument("--models", nargs="*", default=sorted(MODELS), choices=sorted(MODELS))
    ap.add_argument("--partitions", type=int, nargs="*", default=None,
                    help="P values (default 1, 2, then powers of 2 up to the core count)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of taking turns")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run wait up to this many seconds for idle cores (the "
                         "machine is shared); 0: do not wait")
    ap.add_argument("--split", choices=("rows", "locations"), default="locations",
                    help="how locally connected layers are cut (PartitionPlan split): by output "
                         "locations (default: even work to one location) or by whole rows")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="fc", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--number", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from mpi4py import MPI

        out = worker(args.model, args.single, args.number, args.repeats, args.split)
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(json.dumps(out), flush=True)
        return

    cores = len(os.sched_getaffinity(0))
    parts = args.partitions or sorted({1, 2, *(p for p in (4, 8, 16) if p <= cores)})
    rounds = 1 if args.quick else args.rounds
    number = {"fc": 1 if args.quick else 2, "lc": 2 if args.quick else 6}
    repeats = 1 if args.quick else 4
    info = C.machine_info()
    results: dict[str, dict] = {}
    for model in args.models:
        runs: dict[str, list] = {"model": [], **{str(p): [] for p in parts}}
        for r in range(rounds):
            for key, outs in runs.items():
                single = key == "model"
                P = 1 if single else int(key)
                idle = _wait_quiet(0.9 * min(cores, max(P, 2)), args.quiet_wait) \
                    if args.quiet_wait else _idle_cores()
                out = _launch(model, P, single, number[model], repeats, args.split)
                out["idle_cores_before"] = round(idle, 2)
                outs.append(out)
                label = "unpartitioned" if single else "P=" + key
                print(f"[{model} round {r + 1}/{rounds}] {label}"
                      f": {C.median(out['samples_s']) * 1e3:.1f} ms/step "
                      f"(idle cores before {idle:.2f}, load {os.getloadavg()[0]:.2f})",
                      flush=True)
        results[model] = runs

    payload = {"quick": args.quick, "machine": info, "cores": cores, "partitions": parts,
               "split": args.split,
               "models": {k: MODELS[k]["what"] for k in args.models}, "runs": results}
    rows = []
    for model in args.models:
        runs = results[model]
        samples = [s for o in runs["model"] for s in o["samples_s"]]
        base, base_best = C.median(samples), min(samples)
        rows.append([model, "unpartitioned", f"{base * 1e3:.1f}", f"{base_best * 1e3:.1f}",
                     "1.00", "1.00", "-", "-", "-"])
        summary = {"unpartitioned_ms": base * 1e3, "unpartitioned_best_ms": base_best * 1e3}
        for p in parts:
            outs = runs[str(p)]
            samples = [s for o in outs for s in o["samples_s"]]
            t, best = C.median(samples), min(samples)
            mb = outs[-1]["bytes_per_step"] / 1e6
            wait = C.median([max(o["wait_s_per_step"]) / C.median(o["samples_s"]) for o in outs])
            over_cores = " (oversubscribed)" if p > cores else ""
            rows.append([model, f"P={p}{over_cores}", f"{t * 1e3:.1f}", f"{best * 1e3:.1f}",
                         f"{base / t:.2f}", f"{base_best / best:.2f}", f"{mb:.2f}",
                         f"{outs[-1]['messages_per_step']:.0f}", f"{100 * wait:.0f}%"])
            summary[f"P={p}"] = {"ms": t * 1e3, "best_ms": best * 1e3, "speedup": base / t,
                                 "speedup_best": base_best / best, "MB_per_step": mb,
                                 "bytes_per_step_planned": outs[-1]["bytes_per_step_planned"],
                                 "max_wait_fraction": wait}
        payload[f"summary_{model}"] = summary
    n_samples = rounds * repeats
    table = C.print_table(
        ["model", "partitions", "ms/step median", "ms/step best", "speedup (median)",
         "speedup (best)", "MB/step across", "messages/step", "max wait"], rows,
        title=f"time per minibatch (forward + backward), {n_samples} samples per row from "
              f"{rounds} rounds; {cores} cores, load {os.getloadavg()[0]:.2f}; local layers "
              f"split by {args.split}")
    payload["table"] = table
    C.write_json("model_parallel" + ("_rows" if args.split == "rows" else "")
                 + ("_quick" if args.quick else ""), payload)


if __name__ == "__main__":
    main()
