"""Dense-layer kernels against raw sgemm, and the elementwise kernels against numpy.

For the paper's acoustic-model shapes (batch 128 and 256; 440->2560, 2560->2560, 2560->8192)
it times ``dense_forward + dense_backward`` (three GEMMs plus the fused bias/activation passes)
and the same three GEMMs done bare, through numpy's and through scipy's BLAS (the kernels
call one of them: cython_kernels._blasinfo), side by side in one process. The ratio is our
GFLOP/s over the faster raw sgemm (goal >= 0.90); the CPU-time ratio the same from CPU
seconds (the calling thread's at 1 thread, the whole process's at 2: pool threads, spinning
included). ``--rounds`` whole runs
(fresh processes, the thread counts interleaved) give the medians in the table, with the
lowest and highest ratio and the load average before each run.

    python benchmarks/kernels.py            # 1 and 2 threads, 5 rounds: results/kernels.json
    python benchmarks/kernels.py --quick    # smoke run
    python benchmarks/kernels.py --sweep    # also time every GEMM route of cython_kernels._dense
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SHAPES = [(B, n_in, n_out) for B in (128, 256)
          for n_in, n_out in ((440, 2560), (2560, 2560), (2560, 8192))]
ACTS = ["sigmoid", "relu"]


class _Dense:
    """Arrays of one dense layer and the ways of doing its forward + backward."""

    def __init__(self, B: int, n_in: int, n_out: int, rng):
        import numpy as np

        self.shape = f"{B}x{n_in}->{n_out}"
        self.flops = 3 * 2.0 * B * n_in * n_out
        self.x = rng.standard_normal((B, n_in), dtype=np.float32)
        self.W = (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(
            np.float32)
        self.b = rng.standard_normal(n_out, dtype=np.float32)
        self.y = np.empty((B, n_out), np.float32)
        self.dy0 = rng.standard_normal((B, n_out), dtype=np.float32)
        self.dy = self.dy0.copy()
        self.dW, self.db, self.dx = (np.empty_like(self.W), np.empty_like(self.b),
                                     np.empty_like(self.x))

    def ours(self, act: str, route: tuple | None = None):
        import cython_kernels as ck
        from cython_kernels import _dense

        def f():
            if route is not None:
                _dense.GEMM["forward"], _dense.GEMM["backward"] = route
            ck.dense_forward(self.x, self.W, self.b, self.y, act)
            # dense_backward scales dy in place (denormals within a few calls): reset it;
            # the raw GEMM loops pay the same copy
            self.dy[...] = self.dy0
            ck.dense_backward(self.x, self.W, self.y, self.dy, act, self.dW, self.db, self.dx)
        return f

    def raw_numpy(self):
        import numpy as np

        np.matmul(self.x, self.W, out=self.y)
        self.dy[...] = self.dy0
        np.matmul(self.x.T, self.dy, out=self.dW)
        np.matmul(self.dy, self.W.T, out=self.dx)

    def raw_scipy(self):
        from scipy.linalg import blas

        blas.sgemm(1.0, self.W.T, self.x.T, beta=0.0, c=self.y.T, overwrite_c=1)
        self.dy[...] = self.dy0
        blas.sgemm(1.0, self.dy.T, self.x.T, beta=0.0, c=self.dW.T, trans_b=1, overwrite_c=1)
        blas.sgemm(1.0, self.W.T, self.dy.T, beta=0.0, c=self.dx.T, trans_a=1, overwrite_c=1)


def worker(threads: int, quick: bool) -> dict:
    C.check_threads(threads)
    import numpy as np

    import cython_kernels as ck
    from cython_kernels import reference as ref
    from cython_kernels._blasinfo import kernel_blas

    library = kernel_blas()["library"]  # the BLAS (and thread pool) our GEMMs use

    repeats, number = (2, 1) if quick else (5, 1)
    rng = np.random.default_rng(0)
    # the process's first calls pay for starting the BLAS pools and faulting pages in: without
    # this, the first cell timed (the same shape, its first side) had a round 20% low
    warm = _Dense(*SHAPES[0], np.random.default_rng(1))
    for fn in (warm.ours("sigmoid"), warm.raw_numpy, warm.raw_scipy):
        for _ in range(20):
            fn()
        time.sleep(0.3)
    dense = []
    for shape in SHAPES:
        case = _Dense(*shape, rng)
        for act in ACTS:
            cpu = {}
            fns = {"dbmpi": case.ours(act), "numpy": case.raw_numpy, "scipy": case.raw_scipy}
            if threads == 1:
                s = C.interleaved(fns, repeats, number, cpu_out=cpu)
            else:
                s = _phased(fns, repeats, threads, cpu)
            t = {k: C.median(v) for k, v in s.items()}
            tc = {k: C.median(v) for k, v in cpu.items()}
            raw = min(t["numpy"], t["scipy"])
            dense.append({
                "shape": case.shape, "activation": act,
                "dbmpi_ms": 1e3 * t["dbmpi"], "sgemm_numpy_ms": 1e3 * t["numpy"],
                "sgemm_scipy_ms": 1e3 * t["scipy"],
                "dbmpi_gflops": case.flops / t["dbmpi"] / 1e9,
                "sgemm_gflops": case.flops / raw / 1e9,
                "ratio": raw / t["dbmpi"],
                # from CPU time (robust to a busy machine): at 2 threads the process's, so
                # that a pool spinning on a core counts
                "cpu_ratio": min(tc["numpy"], tc["scipy"]) / tc["dbmpi"],
                "samples_s": s, "cpu_samples_s": cpu,
            })

    # memory-bound kernels against the obvious numpy code (GB/s of compulsory traffic)
    elem = []
    B, n = 256, 8192
    logits = rng.standard_normal((B, n), dtype=np.float32)
    labels = rng.integers(0, n, B)
    d = np.empty_like(logits)
    s = C.interleaved({"dbmpi": lambda: ck.softmax_xent(logits, labels, d),
                       "numpy": lambda: ref.softmax_xent(logits, labels, d)}, repeats, number)
    elem.append(_elem_row("softmax_xent 256x8192", 2 * logits.nbytes, s))
    n_params = 42_000_000
    p = rng.standard_normal(n_params, dtype=np.float32)
    g = rng.standard_normal(n_params, dtype=np.float32) * 1e-3
    a = np.ones(n_params, np.float32)

    def np_adagrad():
        a.__iadd__(g * g)
        p.__isub__(0.01 * g / (np.sqrt(a) + 1e-8))

    s = C.interleaved({"dbmpi": lambda: ck.sgd_dense(p, g, 1e-3),
                       "numpy": lambda: p.__isub__(np.float32(1e-3) * g)}, repeats, 1)
    elem.append(_elem_row("sgd_dense 42M", 3 * p.nbytes, s))
    s = C.interleaved({"dbmpi": lambda: ck.adagrad_dense(p, g, a, 0.01, 1e-8),
                       "numpy": np_adagrad}, repeats, 1)
    elem.append(_elem_row("adagrad_dense 42M", 5 * p.nbytes, s))
    return {"threads": threads, "kernel_blas": library, "dense": dense, "elementwise": elem}


def _phased(fns: dict, repeats: int, threads: int, cpu_out: dict) -> dict[str, list]:
    """Each side timed on its own, in turn (the order turning each round), ``repeats`` rounds.

    numpy and scipy each bring their own OpenBLAS thread pool: with several threads,
    alternating call by call makes each wait on the other's spinning workers. Timing the
    kernels call by call beside the raw GEMMs of their own library and the other library's
    alone (until 12-04) favoured the one alone by 3-5% (measured both ways round), so now
    every side is timed alone: 3 calls after one warm-up, then a pause for the pool to sleep.
    """
    names = list(fns)
    s = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            cpu = {}
            s[k] += C.interleaved({k: fns[k]}, 1, 3, cpu_out=cpu, threads=threads)[k]
            cpu_out.setdefault(k, []).extend(cpu[k])
            time.sleep(0.3)
    return s


def sweep(threads: int, quick: bool) -> list[dict]:
    """Forward+backward of each dense shape under every GEMM route (cython_kernels._dense.GEMM)."""
    import numpy as np

    from cython_kernels import _dense

    repeats, number = (2, 1) if quick else (5, 2)
    rng = np.random.default_rng(3)
    routes = [(f, "blas") for f in ("blas-nn", "blas-tt", "numpy-nn", "numpy-tt")]
    routes += [("numpy-nn", "numpy"), ("auto", "blas")]
    out = []
    for shape in SHAPES:
        case = _Dense(*shape, rng)
        s = C.interleaved({f"{r[0]}/{r[1]}": case.ours("sigmoid", r) for r in routes},
                          repeats, number, pause=0.3 if threads > 1 else 0)
        _dense.GEMM.update({"forward": "auto", "backward": "blas"})
        out.append({"shape": case.shape,
                    "gflops": {k: case.flops / C.median(v) / 1e9 for k, v in s.items()}})
    return out


def _elem_row(name, nbytes, s):
    t = {k: C.median(v) for k, v in s.items()}
    return {"kernel": name, "dbmpi_ms": 1e3 * t["dbmpi"], "numpy_ms": 1e3 * t["numpy"],
            "dbmpi_GBs": nbytes / t["dbmpi"] / 1e9, "speedup_vs_numpy": t["numpy"] / t["dbmpi"],
            "samples_s": s}


def _median_of_rounds(runs: list[dict], key: str) -> list[dict]:
    """One row per case: the median over rounds of each number, with the ratio's range."""
    out = []
    for rows in zip(*(r[key] for r in runs)):
        row = {k: C.median([x[k] for x in rows]) for k, v in rows[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row.update({k: v for k, v in rows[0].items() if isinstance(v, str)})
        if "ratio" in row:
            row["ratio_min"] = min(x["ratio"] for x in rows)
            row["ratio_max"] = max(x["ratio"] for x in rows)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5,
                    help="whole runs per thread count, interleaved (default 5)")
    ap.add_argument("--sweep", action="store_true", help="also time every dense GEMM route")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import json

        res = worker(args.threads[0], args.quick)
        if args.sweep:
            res["sweep"] = sweep(args.threads[0], args.quick)
        print(json.dumps(res))
        return
    flags = (["--quick"] if args.quick else []) + (["--sweep"] if args.sweep else [])
    runs = {t: [] for t in args.threads}
    loads = []
    for i in range(1 if args.quick else args.rounds):
        for t in args.threads:
            loads.append({"round": i, "threads": t, "loadavg_1min": os.getloadavg()[0]})
            runs[t].append(C.run_worker(__file__, t, flags))
            print(f"round {i + 1}, {t} thread(s) done (load {loads[-1]['loadavg_1min']:.2f})",
                  flush=True)
    results = [{"threads": t, "dense": _median_of_rounds(rs, "dense"),
                "elementwise": _median_of_rounds(rs, "elementwise"),
                **({"sweep": rs[0]["sweep"]} if args.sweep else {})} for t, rs in runs.items()]
    rows, erows = [], []
    for r in results:
        for d in r["dense"]:
            rows.append([r["threads"], d["shape"], d["activation"], d["dbmpi_ms"],
                         d["sgemm_numpy_ms"], d["sgemm_scipy_ms"], d["dbmpi_gflops"],
                         d["sgemm_gflops"], d["ratio"], f"{d['ratio_min']:.3f}-"
                         f"{d['ratio_max']:.3f}", d["cpu_ratio"]])
        for e in r["elementwise"]:
            erows.append([r["threads"], e["kernel"], e["dbmpi_ms"], e["numpy_ms"],
                          e["dbmpi_GBs"], e["speedup_vs_numpy"]])
    load = [x["loadavg_1min"] for x in loads]
    t1 = C.print_table(["threads", "shape", "act", "dbmpi ms", "sgemm np ms", "sgemm sp ms",
                        "dbmpi GFLOP/s", "sgemm GFLOP/s", "ratio", "range", "cpu-time ratio"],
                       rows, "dense forward+backward (3 GEMMs + fused passes) vs the same 3 raw "
                       f"sgemm; medians of {len(runs[args.threads[0]])} rounds, load "
                       f"{min(load):.2f}-{max(load):.2f}; the kernels call "
                       f"{runs[args.threads[0]][0].get('kernel_blas', '?')}'s BLAS")
    t2 = C.print_table(["threads", "kernel", "dbmpi ms", "numpy ms", "dbmpi GB/s", "x numpy"],
                       erows, "memory-bound kernels")
    tables = [t1, t2]
    if args.sweep:
        names = list(results[0]["sweep"][0]["gflops"])
        tables.append(C.print_table(
            ["threads", "shape", *names],
            [[r["threads"], sw["shape"], *(sw["gflops"][n] for n in names)]
             for r in results for sw in r["sweep"]],
            "GEMM routes (forward/backward), dense fwd+bwd GFLOP/s (first round)"))
    machine = C.machine_info()
    machine["loadavg_at_end"] = os.getloadavg()
    C.write_json("kernels", {"quick": args.quick, "machine": machine, "loads": loads,
                             "results": results, "runs": runs, "tables": tables})


if __name__ == "__main__":
    main()
