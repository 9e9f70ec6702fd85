"""What a bigger neural language model would cost per step: forward + backward of one
minibatch on one core, for the model of ``jobs/configs/lm_kjv.toml`` (the one measured on the
King James Bible and the Penn Treebank) and the three ways to go further.

    python benchmarks/lm_costs.py [--vocab 10000] [--batch 128] [--repeats 20]

- base: 6 context words -> 64-d embedding -> 512 tanh -> softmax over the vocabulary;
- a larger hidden layer (1,024 tanh units);
- more context (10 words);
- a class-factored softmax (Goodman 2001, Mikolov et al. 2011): a softmax over sqrt(V)
  classes, then over the sqrt(V) words of the true class. Per example it computes sqrt(V) +
  sqrt(V) output scores instead of V, so it is timed as the base model with an output layer of
  2 sqrt(V) units (dbmpi has no class-factored layer: this is its cost, not its accuracy).

Median of ``--repeats`` timed steps (after 3 warm-up steps), one BLAS thread, as a rank of
``dbmpi launch`` runs. Prints the table and writes ``benchmarks/results/lm_costs.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one thread, as a rank

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from _common import machine_info, print_table, write_json  # noqa: E402

from dbmpi.model import Model  # noqa: E402


def step_ms(context: int, dim: int, hidden: int, outputs: int, batch: int,
            repeats: int) -> tuple[float, int]:
    """Median ms of forward + backward (training mode, dropout as in lm_kjv.toml)."""
    layers = [{"type": "embedding", "dim": dim, "dropout": 0.1},
              {"type": "dense", "units": hidden, "activation": "tanh", "dropout": 0.4}]
    model = Model.from_spec((context,), layers, outputs, "softmax")
    model.init_params(0)
    model.seed_training([0, 0])
    rng = np.random.default_rng(0)
    x = rng.integers(0, min(outputs, 10_000), (batch, context))
    y = rng.integers(0, outputs, batch)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        model.forward_backward(x, y)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), model.num_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    v, classes = a.vocab, 2 * math.isqrt(a.vocab)
    variants = [("base: 6 words, 64-d, 512 tanh, softmax over V", 6, 64, 512, v),
                ("larger hidden layer: 1,024 tanh", 6, 64, 1024, v),
                ("more context: 10 words", 10, 64, 512, v),
                (f"class-factored softmax: 2 x sqrt(V) = {classes} outputs", 6, 64, 512,
                 classes)]
    rows, out = [], []
    base = None
    for name, ctx, dim, hidden, outputs in variants:
        ms, params = step_ms(ctx, dim, hidden, outputs, a.batch, a.repeats)
        if outputs == classes:  # it keeps every word's output row, and adds a class layer
            params = out[0]["params"] + hidden * math.isqrt(v) + math.isqrt(v)
        base = base or ms
        out.append({"model": name, "context": ctx, "dim": dim, "hidden": hidden,
                    "outputs": outputs, "params": params, "ms_per_step": ms,
                    "vs_base": ms / base})
        rows.append([name, f"{params:,}", round(ms, 2), round(ms / base, 2)])
        print(f"  {rows[-1]}", flush=True)
    print_table(["model", "parameters", "ms per step (fwd + bwd)", "x base"], rows,
                title=f"vocabulary {v}, batch {a.batch}, one thread, median of {a.repeats}; "
                      f"load average {os.getloadavg()[0]:.2f}")
    write_json("lm_costs", {"machine": machine_info(), "vocab": v, "batch": a.batch,
                            "rows": out})


if __name__ == "__main__":
    main()
