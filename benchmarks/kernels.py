"""Dense-layer kernels against raw sgemm, and the elementwise kernels against numpy.

For the paper's acoustic-model shapes (batch 256; 440->2560, 2560->2560, 2560->8192) it times
``dense_forward + dense_backward`` (three GEMMs plus the fused bias/activation passes) and the
same three GEMMs done bare, through numpy's and through scipy's BLAS (the one the kernels call),
side by side in one process. The ratio is our GFLOP/s over the faster raw sgemm. Goal >= 0.90.

    python benchmarks/kernels.py            # 1 and 2 threads, writes results/kernels.json
    python benchmarks/kernels.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPES = [(256, 440, 2560), (256, 2560, 2560), (256, 2560, 8192)]
ACTS = ["sigmoid", "relu"]


def worker(threads: int, quick: bool) -> dict:
    C.check_threads(threads)
    import numpy as np
    from scipy.linalg import blas

    import cython_kernels as ck
    from cython_kernels import reference as ref

    repeats, number = (3, 2) if quick else (9, 3)
    rng = np.random.default_rng(0)
    dense = []
    for B, n_in, n_out in SHAPES:
        x = rng.standard_normal((B, n_in), dtype=np.float32)
        W = (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)
        b = rng.standard_normal(n_out, dtype=np.float32)
        y, dy0 = np.empty((B, n_out), np.float32), rng.standard_normal((B, n_out), dtype=np.float32)
        dy = dy0.copy()
        dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
        flops = 3 * 2.0 * B * n_in * n_out
        for act in ACTS:
            def ours():
                ck.dense_forward(x, W, b, y, act)
                dy[...] = dy0  # dense_backward consumes dy; both sides pay this copy
                ck.dense_backward(x, W, y, dy, act, dW, db, dx)

            def raw_numpy():
                np.matmul(x, W, out=y)
                dy[...] = dy0
                np.matmul(x.T, dy, out=dW)
                np.matmul(dy, W.T, out=dx)

            def raw_scipy():
                blas.sgemm(1.0, W.T, x.T, beta=0.0, c=y.T, overwrite_c=1)
                dy[...] = dy0
                blas.sgemm(1.0, dy.T, x.T, beta=0.0, c=dW.T, trans_b=1, overwrite_c=1)
                blas.sgemm(1.0, W.T, dy.T, beta=0.0, c=dx.T, trans_a=1, overwrite_c=1)

            s = C.interleaved({"dbmpi": ours, "numpy": raw_numpy, "scipy": raw_scipy},
                              repeats, number)
            t = {k: C.median(v) for k, v in s.items()}
            raw = min(t["numpy"], t["scipy"])
            dense.append({
                "shape": f"{B}x{n_in}->{n_out}", "activation": act,
                "dbmpi_ms": 1e3 * t["dbmpi"], "sgemm_numpy_ms": 1e3 * t["numpy"],
                "sgemm_scipy_ms": 1e3 * t["scipy"],
                "dbmpi_gflops": flops / t["dbmpi"] / 1e9, "sgemm_gflops": flops / raw / 1e9,
                "ratio": raw / t["dbmpi"], "samples_s": s,
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
    return {"threads": threads, "dense": dense, "elementwise": elem}


def _elem_row(name, nbytes, s):
    t = {k: C.median(v) for k, v in s.items()}
    return {"kernel": name, "dbmpi_ms": 1e3 * t["dbmpi"], "numpy_ms": 1e3 * t["numpy"],
            "dbmpi_GBs": nbytes / t["dbmpi"] / 1e9, "speedup_vs_numpy": t["numpy"] / t["dbmpi"],
            "samples_s": s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(args.threads[0], args.quick)))
        return
    results = [C.run_worker(__file__, t, ["--quick"] if args.quick else []) for t in args.threads]
    rows, erows = [], []
    for r in results:
        for d in r["dense"]:
            rows.append([r["threads"], d["shape"], d["activation"], d["dbmpi_ms"],
                         d["sgemm_numpy_ms"], d["sgemm_scipy_ms"], d["dbmpi_gflops"],
                         d["sgemm_gflops"], d["ratio"]])
        for e in r["elementwise"]:
            erows.append([r["threads"], e["kernel"], e["dbmpi_ms"], e["numpy_ms"],
                          e["dbmpi_GBs"], e["speedup_vs_numpy"]])
    t1 = C.print_table(["threads", "shape", "act", "dbmpi ms", "sgemm np ms", "sgemm sp ms",
                        "dbmpi GFLOP/s", "sgemm GFLOP/s", "ratio"], rows,
                       "dense forward+backward (3 GEMMs + fused passes) vs the same 3 raw sgemm")
    t2 = C.print_table(["threads", "kernel", "dbmpi ms", "numpy ms", "dbmpi GB/s", "x numpy"],
                       erows, "memory-bound kernels")
    C.write_json("kernels", {"quick": args.quick, "machine": C.machine_info(),
                             "results": results, "tables": [t1, t2]})


if __name__ == "__main__":
    main()
