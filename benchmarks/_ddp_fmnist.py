"""PyTorch DDP reference for benchmarks/downpour.py: time to a Fashion-MNIST test accuracy.

2 processes x 1 thread, gloo, the same 784-512-256-10 ReLU MLP and 64 examples per process
per step as the dbmpi run; each process reads its half of the training set (shuffled every
epoch). Rank 0 evaluates on the test set every ``--eval-every`` steps with the clock stopped
(dbmpi evaluates on its own coordinator rank, so evaluation costs DDP nothing either).
Writes {"seconds", "best_accuracy", "samples", "steps"} to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_tools.idx import read_idx_split  # noqa: E402


def worker(rank: int, world: int, args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y, _ = read_idx_split(args.src, "train")
    xt, yt, _ = read_idx_split(args.src, "test")
    x = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255)
    y = torch.from_numpy(y.astype(np.int64))
    xt = torch.from_numpy(xt.reshape(len(xt), -1).astype(np.float32) / 255)
    yt = torch.from_numpy(yt.astype(np.int64))
    mine = torch.arange(rank, len(x), world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = {"adagrad": lambda p: torch.optim.Adagrad(p, lr=args.lr),
           "adam": lambda p: torch.optim.Adam(p, lr=args.lr),
           "sgd": lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9)}[args.optim](
        ddp.parameters())
    lossf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(rank)
    clock, best, step, reached = 0.0, 0.0, 0, None
    flag = torch.zeros(1)
    done = False
    for _epoch in range(int(np.ceil(args.epochs))):
        order = mine[torch.randperm(len(mine), generator=g)]
        for lo in range(0, len(order) - args.batch + 1, args.batch):
            t = time.perf_counter()
            idx = order[lo:lo + args.batch]
            opt.zero_grad(set_to_none=True)
            lossf(ddp(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            clock += time.perf_counter() - t
            if step % args.eval_every == 0:
                if rank == 0:
                    with torch.no_grad():
                        acc = (model(xt).argmax(1) == yt).float().mean().item()
                    best = max(best, acc)
                    flag[0] = 1.0 if acc >= args.target else 0.0
                    if acc >= args.target and reached is None:
                        reached = clock
                dist.broadcast(flag, 0)
                if flag[0] > 0:
                    done = True
                    break
        if done:
            break
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "seconds": reached, "best_accuracy": best, "steps": step,
            "samples": step * args.batch * world if reached else None}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--target", type=float, default=0.89)
    ap.add_argument("--epochs", type=float, default=60)
    ap.add_argument("--optim", default="adagrad", choices=["adagrad", "adam", "sgd"])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
