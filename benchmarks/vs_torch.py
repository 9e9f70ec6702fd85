"""dbmpi against PyTorch CPU at the same thread count, side by side in one run.

1. Training step (forward, backward, update) of the paper's acoustic model,
   440 -> 4 x 2560 sigmoid -> 8192 softmax (about 42M parameters), float32, batch 128 and 256.
   dbmpi: ``dbmpi.model.Model`` (layers on cython_kernels, parameters and gradients in one flat
   float32 vector each) and ``dbmpi.optim.rules.SGD`` (one ``sgd_dense`` call over the whole
   vector). PyTorch: ``nn.Sequential`` of ``Linear``/``Sigmoid``, ``F.cross_entropy`` and
   ``torch.optim.SGD``. Same update rule on both sides: plain SGD, lr 0.01, no momentum; both
   start from the same parameters, see the same fixed batch and count correct predictions.
2. Image kernels, forward + backward: the locally connected layer against an unfold + einsum
   PyTorch equivalent, L2 pooling and local contrast normalisation against the avg_pool2d
   formulations (numerically the same functions; checked before timing).

Each (threads, case) cell runs in a fresh worker process with OPENBLAS/OMP/MKL_NUM_THREADS set
and ``torch.set_num_threads(n)``; dbmpi and PyTorch alternate within the cell (with 2 threads,
after a 0.2 s untimed pause so that neither pays for the other's spinning pool) and the
medians of several repeats are compared. Ratio = dbmpi samples/s over PyTorch samples/s (wall
clock). The table also gives the ratio of CPU time per step (the caller's at one thread, the
whole process's with more: pool threads, spinning included), which a busy shared machine
disturbs much less than wall-clock time (both are in the JSON). The acoustic cells run
``--rounds`` times (fresh processes, the cells interleaved: drift over minutes hits every cell
alike); the table gives the median over rounds, the lowest and highest ratio and the load
average before each round.

    python benchmarks/vs_torch.py           # writes benchmarks/results/vs_torch.json
    python benchmarks/vs_torch.py --quick   # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

HIDDEN, N_IN, N_OUT, DEPTH = 2560, 440, 8192, 4
LR = 0.01
# (name, B, H, W, C, k_or_size, F, stride)
IMAGE_CASES = [
    ("local k5 s1", 32, 32, 32, 8, 5, 16, 1),
    ("local k8 s2", 32, 40, 40, 3, 8, 8, 2),
    ("l2pool 3x3 s2", 32, 32, 32, 32, 3, None, 2),
    ("lcn 9x9", 32, 32, 32, 16, 9, None, 1),
]


# ------------------------------------------------------------------------- acoustic model

def _dbmpi_model():
    from dbmpi.model import Model
    from dbmpi.optim.rules import SGD

    spec = [{"type": "dense", "units": HIDDEN, "activation": "sigmoid"}] * DEPTH
    model = Model.from_spec((N_IN,), spec, N_OUT, loss="softmax")
    model.init_params(seed=0)
    opt = SGD(LR)
    state = opt.init_state(model.num_params)

    def step(x, y):
        loss, _correct = model.forward_backward(x, y)
        opt.step(model.params, model.grads, state)
        return loss

    return model, step


def _torch_model(model):
    """The same network in PyTorch, initialised from the dbmpi parameters."""
    import torch
    from torch import nn

    mods = []
    for layer in model.layers:
        lin = nn.Linear(layer.n_in, layer.n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer.W.T.copy()))
            lin.bias.copy_(torch.from_numpy(layer.b.copy()))
        mods.append(lin)
        if layer.activation == "sigmoid":
            mods.append(nn.Sigmoid())
    net = nn.Sequential(*mods)
    opt = torch.optim.SGD(net.parameters(), lr=LR)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        (logits.detach().argmax(1) == y).sum().item()  # dbmpi counts correct ones too
        return loss.item()

    return net, step


def acoustic(threads: int, batch: int, quick: bool) -> dict:
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, N_IN), dtype=np.float32)
    y = rng.integers(0, N_OUT, batch)
    model, ours = _dbmpi_model()
    _net, theirs = _torch_model(model)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    # same parameters, same batch: the first losses must agree (same work on both sides)
    l_ours, l_theirs = ours(x, y), theirs(xt, yt)
    l2_ours, l2_theirs = ours(x, y), theirs(xt, yt)
    if (abs(l_ours - l_theirs) > 1e-3 * abs(l_theirs)
            or abs(l2_ours - l2_theirs) > 1e-3 * abs(l2_theirs)):
        raise RuntimeError(f"dbmpi and PyTorch disagree: losses {l_ours, l2_ours} vs "
                           f"{l_theirs, l2_theirs}")
    repeats, number = (2, 1) if quick else (5, 2)
    cpu = {}
    s = C.interleaved({"dbmpi": lambda: ours(x, y), "torch": lambda: theirs(xt, yt)},
                      repeats, number, warmup=1, cpu_out=cpu, pause=0.2 if threads > 1 else 0,
                      threads=threads)
    t = {k: C.median(v) for k, v in s.items()}
    tc = {k: C.median(v) for k, v in cpu.items()}
    flops = 6 * sum(layer.n_in * layer.n_out for layer in model.layers) - 2 * N_IN * HIDDEN
    return {"threads": threads, "batch": batch, "params": model.num_params,
            "dbmpi_samples_s": batch / t["dbmpi"], "torch_samples_s": batch / t["torch"],
            "ratio": t["torch"] / t["dbmpi"],
            "dbmpi_gflops": flops * batch / t["dbmpi"] / 1e9,
            "torch_gflops": flops * batch / t["torch"] / 1e9,
            # the same from CPU time (robust to a busy machine; see interleaved)
            "cpu_ratio": tc["torch"] / tc["dbmpi"],
            "first_losses": {"dbmpi": [l_ours, l2_ours], "torch": [l_theirs, l2_theirs]},
            "samples_s": s, "cpu_samples_s": cpu}


# ---------------------------------------------------------------------------- image kernels

def image(threads: int, case: tuple, quick: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import cython_kernels as ck

    name, B, H, Wd, Cin, k, Fo, s = case
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, H, Wd, Cin), dtype=np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)  # NCHW
    kind = name.split()[0]
    if kind == "local":
        OH, OW = (H - k) // s + 1, (Wd - k) // s + 1
        W = (rng.standard_normal((OH, OW, Fo, k, k, Cin), dtype=np.float32) / k).astype(np.float32)
        b = rng.standard_normal((OH, OW, Fo), dtype=np.float32)
        y = np.empty((B, OH, OW, Fo), np.float32)
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
        # torch: unfold gives (B, C*k*k, L) in (c, u, v) order
        Wt = torch.from_numpy(W.transpose(0, 1, 2, 5, 3, 4).reshape(OH * OW, Fo, Cin * k * k)
                              .copy()).requires_grad_(True)
        bt = torch.from_numpy(b.reshape(OH * OW, Fo).copy()).requires_grad_(True)
        dyt = torch.from_numpy(dy.reshape(B, OH * OW, Fo).copy())

        def ours():
            ck.local_forward(x, W, b, s, y)
            ck.local_backward(x, W, dy, s, dW, db, dx)

        def fwd_t():
            cols = F.unfold(xt, k, stride=s)  # (B, q, L)
            return torch.einsum("bql,lfq->blf", cols, Wt) + bt

        def theirs():
            xt.grad = Wt.grad = bt.grad = None
            fwd_t().backward(dyt)

        ours()
        theirs()
        ref_y = fwd_t().detach().numpy().reshape(y.shape)
        _agree(name, [(y, ref_y), (dx, xt.grad.numpy().transpose(0, 2, 3, 1)),
                      (dW, Wt.grad.numpy().reshape(OH, OW, Fo, Cin, k, k)
                                          .transpose(0, 1, 2, 4, 5, 3)),
                      (db, bt.grad.numpy().reshape(b.shape))])
        flops = 3 * 2.0 * B * OH * OW * Fo * k * k * Cin
    elif kind == "l2pool":
        OH, OW = (H - k) // s + 1, (Wd - k) // s + 1
        y = np.empty((B, OH, OW, Cin), np.float32)
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        dx = np.empty_like(x)
        dyt = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())

        def ours():
            ck.l2pool_forward(x, k, s, y)
            ck.l2pool_backward(x, y, dy, k, s, dx)

        def fwd_t():
            return torch.sqrt(ck.L2POOL_EPS + F.avg_pool2d(xt * xt, k, s) * (k * k))

        def theirs():
            xt.grad = None
            fwd_t().backward(dyt)

        ours()
        theirs()
        _agree(name, [(y, fwd_t().detach().numpy().transpose(0, 2, 3, 1)),
                      (dx, xt.grad.numpy().transpose(0, 2, 3, 1))])
        flops = None
    else:  # lcn
        y, v = np.empty_like(x), np.empty_like(x)
        den = np.empty(x.shape[:3], np.float32)
        dy = rng.standard_normal(x.shape, dtype=np.float32)
        dx = np.empty_like(x)
        dyt = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
        r = k // 2

        def ours():
            ck.lcn_forward(x, k, y, v, den)
            ck.lcn_backward(dy, v, den, k, dx)

        def box_mean(p):  # mean over the in-image part of each k x k window
            return F.avg_pool2d(p, k, 1, padding=r, count_include_pad=False)

        def fwd_t():
            vt = xt - box_mean(xt.mean(1, keepdim=True))
            return vt / torch.sqrt(ck.LCN_EPS + box_mean((vt * vt).mean(1, keepdim=True)))

        def theirs():
            xt.grad = None
            fwd_t().backward(dyt)

        ours()
        theirs()
        _agree(name, [(y, fwd_t().detach().numpy().transpose(0, 2, 3, 1)),
                      (dx, xt.grad.numpy().transpose(0, 2, 3, 1))])
        flops = None
    repeats, number = (3, 1) if quick else (9, 3)
    cpu = {}
    samp = C.interleaved({"dbmpi": ours, "torch": theirs}, repeats, number, cpu_out=cpu,
                         pause=0.2 if threads > 1 else 0, threads=threads)
    t = {kk: C.median(vv) for kk, vv in samp.items()}
    tc = {kk: C.median(vv) for kk, vv in cpu.items()}
    out = {"threads": threads, "case": name, "shape": [B, H, Wd, Cin], "k": k, "F": Fo,
           "stride": s, "dbmpi_ms": 1e3 * t["dbmpi"], "torch_ms": 1e3 * t["torch"],
           "dbmpi_samples_s": B / t["dbmpi"], "torch_samples_s": B / t["torch"],
           "ratio": t["torch"] / t["dbmpi"],
           "cpu_ratio": tc["torch"] / tc["dbmpi"],
           "samples_s": samp, "cpu_samples_s": cpu}
    if flops:
        out["dbmpi_gflops"] = flops / t["dbmpi"] / 1e9
        out["torch_gflops"] = flops / t["torch"] / 1e9
    return out


def _median_cell(rounds: list[dict]) -> dict:
    """One acoustic cell over its rounds: medians, the ratio's range, every round kept."""
    keys = ("dbmpi_samples_s", "torch_samples_s", "ratio", "cpu_ratio", "dbmpi_gflops",
            "torch_gflops")
    out = {k: rounds[0][k] for k in ("threads", "batch", "params")}
    out.update({k: C.median([r[k] for r in rounds]) for k in keys})
    out["ratio_min"] = min(r["ratio"] for r in rounds)
    out["ratio_max"] = max(r["ratio"] for r in rounds)
    out["rounds"] = rounds
    return out


def _agree(name, pairs):
    import numpy as np

    for a, b in pairs:
        scale = float(np.max(np.abs(b))) or 1.0
        err = float(np.max(np.abs(a - b))) / scale
        if err > 1e-4:
            raise RuntimeError(f"{name}: dbmpi and the PyTorch equivalent differ ({err:.2e})")


# -------------------------------------------------------------------------------- driver

def worker(threads: int, what: str, quick: bool) -> dict:
    C.check_threads(threads)
    import torch

    torch.set_num_threads(threads)
    if what.startswith("acoustic"):
        return acoustic(threads, int(what.split(":")[1]), quick)
    return image(threads, next(c for c in IMAGE_CASES if c[0] == what), quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--rounds", type=int, default=5,
                    help="runs of every acoustic cell, interleaved (default 5)")
    ap.add_argument("--no-images", action="store_true", help="only the acoustic model")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(args.threads[0], args.what, args.quick)))
        return
    q = ["--quick"] if args.quick else []
    cells = [(batch, t) for batch in args.batches for t in args.threads]
    runs, loads = {c: [] for c in cells}, []
    for i in range(1 if args.quick else args.rounds):
        for batch, t in cells:
            loads.append({"round": i, "batch": batch, "threads": t,
                          "loadavg_1min": os.getloadavg()[0]})
            runs[batch, t].append(C.run_worker(__file__, t, ["--what", f"acoustic:{batch}", *q]))
            print(f"round {i + 1}: batch {batch}, {t} thread(s): ratio "
                  f"{runs[batch, t][-1]['ratio']:.3f} (load {loads[-1]['loadavg_1min']:.2f})",
                  flush=True)
    acoustic_res = [_median_cell(rs) for rs in runs.values()]
    image_res = []
    if not args.no_images:
        for case in IMAGE_CASES:
            for t in args.threads:
                image_res.append(C.run_worker(__file__, t, ["--what", case[0], *q]))
    import torch

    load = [x["loadavg_1min"] for x in loads]
    t1 = C.print_table(
        ["batch", "threads", "dbmpi samples/s", "torch samples/s", "ratio", "range",
         "cpu-time ratio", "dbmpi GFLOP/s", "torch GFLOP/s"],
        [[r["batch"], r["threads"], r["dbmpi_samples_s"], r["torch_samples_s"], r["ratio"],
          f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}", r["cpu_ratio"], r["dbmpi_gflops"],
          r["torch_gflops"]] for r in acoustic_res],
        f"acoustic model training step (440-4x2560 sigmoid-8192 softmax, "
        f"{acoustic_res[0]['params'] / 1e6:.1f}M params, float32, SGD); medians of "
        f"{len(runs[cells[0]])} rounds, load {min(load):.2f}-{max(load):.2f}")
    tables = [t1]
    if image_res:
        tables.append(C.print_table(
            ["case", "threads", "dbmpi ms", "torch ms", "dbmpi samples/s", "torch samples/s",
             "ratio", "cpu-time ratio"],
            [[r["case"], r["threads"], r["dbmpi_ms"], r["torch_ms"], r["dbmpi_samples_s"],
              r["torch_samples_s"], r["ratio"], r["cpu_ratio"]] for r in image_res],
            "image kernels, forward + backward (PyTorch: unfold+einsum / avg_pool2d forms)"))
    machine = C.machine_info()
    machine["torch"] = torch.__version__
    machine["torch_config"] = torch.__config__.show()
    machine["loadavg_at_end"] = os.getloadavg()
    C.write_json("vs_torch", {"quick": args.quick, "machine": machine, "lr": LR, "loads": loads,
                              "update_rule": "SGD (no momentum) on both sides",
                              "acoustic": acoustic_res, "images": image_res, "tables": tables})


if __name__ == "__main__":
    main()
