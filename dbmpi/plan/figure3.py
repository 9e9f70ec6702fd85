"""The paper's Figure 3, extrapolated: speedup of one model replica against machines per model.

Two models, each cut over P machines of C cores (the time of one minibatch, forward and
backward, at P machines against one):

* the paper's **speech model** (440 -> 4 x 2560 sigmoid -> 8192 softmax, 42M parameters), cut
  by units as dbmpi cuts dense layers (every boundary is an all-gather forward and a
  reduce-scatter backward, P - 1 messages each way: :func:`speech_exchange`);
* a **locally connected image model** (200 x 200 x 3 images, three stages of local filters
  18 x 18 stride 2, 8 maps, + L2 pooling; the structure of Le et al.'s model) cut into a grid
  of tiles as DistBelief cut it: a tile exchanges only halo strips with its 8 neighbours.

A step at P machines = the slowest machine's compute (compute / P, times the expected maximum
of P machines whose speed varies by ``jitter``: the paper's "waiting for the slowest
machine") + at every layer boundary, forward and backward, the messages' latency and bytes
over the link. All rates are assumptions or calibrated figures named in the legend and in
docs/planner.md; nothing here was measured at that scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .cost import FLOAT, Link, Machine

SPEECH = {"input": (440,), "classes": 8192, "batch": 128,
          "layers": [{"type": "dense", "units": 2560, "activation": "sigmoid"}] * 4}
# (kernel, stride, maps) of each local stage, each followed by L2 pooling 2 x 2 stride 2
IMAGE_STAGES = ((18, 2, 8), (18, 2, 8), (18, 2, 8))
IMAGE_SIDE, IMAGE_CHANNELS, IMAGE_BATCH = 200, 3, 32
# the paper's published points (its text, not digitised curves): speech fastest at 8
# machines, 2.2x one machine; the 1.7B-parameter image model > 12x on 81 machines
PAPER = {"speech": [(1, 1.0), (8, 2.2)], "image": [(1, 1.0), (81, 12.0)]}
MACHINES = (1, 2, 4, 8, 16, 32, 64, 81, 128, 256, 625)


@dataclass(frozen=True)
class Cluster:
    """What one machine of the extrapolation is: its cores and their rate, and its link."""

    name: str
    cores: int
    gflops_per_core: float
    link: Link
    jitter: float = 0.05  # spread of machine speeds (std / mean): the straggler effect


def _slowest(P: int, jitter: float) -> float:
    """Expected maximum of P normal speeds relative to the mean (~ 1 + jitter sqrt(2 ln P))."""
    return 1.0 + jitter * math.sqrt(2 * math.log(P)) if P > 1 else 1.0


def speech_exchange(P: int, batch: int) -> tuple[float, int]:
    """Bytes one partition sends per step and the messages of the step, for the speech model
    cut by units over P (as :class:`~dbmpi.model.partition.PartitionPlan` cuts it: each
    partition sends its share of every hidden activation to the P - 1 others forward, the
    gradient of what it received back, and its logits forward only). Closed form, so that
    P = 625 costs nothing; tests/test_plan.py checks it against the plan for small P."""
    hidden = [layer["units"] for layer in SPEECH["layers"]]
    share = (P - 1) / P
    sent = (2 * sum(hidden) + SPEECH["classes"]) * share * batch * FLOAT
    boundaries = 2 * len(hidden) + 1  # all-gathers forward, reduce-scatters back, logits
    return sent, boundaries * (P - 1)


def speech_step(P: int, c: Cluster) -> float:
    B = SPEECH["batch"]
    sizes = [SPEECH["input"][0]] + [layer["units"] for layer in SPEECH["layers"]]
    sizes.append(SPEECH["classes"])
    flops = sum(2 * (a * b + b) * (2 if i == 0 else 3) * B
                for i, (a, b) in enumerate(zip(sizes, sizes[1:])))
    compute = flops / P / (c.cores * c.gflops_per_core * 1e9) * _slowest(P, c.jitter)
    if P == 1:
        return compute
    sent, messages = speech_exchange(P, B)
    return compute + c.link.time(sent, messages)


def image_step(P: int, c: Cluster) -> float:
    """Grid of a x b tiles (a * b = P, as square as P allows)."""
    a = max(d for d in range(1, int(math.isqrt(P)) + 1) if P % d == 0)
    b = P // a
    side, ch, B = IMAGE_SIDE, IMAGE_CHANNELS, IMAGE_BATCH
    flops = exchange_bytes = 0.0
    messages = 0
    for kernel, stride, maps in IMAGE_STAGES:
        out = (side - kernel) // stride + 1
        flops += 6 * out * out * maps * kernel * kernel * ch * B / P
        if P > 1:  # each tile receives (kernel - stride) input rows/columns from each side
            halo = (kernel - stride) * ch * (2 * side / a + 2 * side / b)
            exchange_bytes += 2 * halo * B * FLOAT  # forward halos + backward halo gradients
            messages += 2 * 8
        side, ch = out // 2, maps  # L2 pooling 2 x 2 stride 2
    compute = flops / (c.cores * c.gflops_per_core * 1e9) * _slowest(P, c.jitter)
    return compute + (c.link.time(exchange_bytes, messages) if P > 1 else 0.0)


def curves(c: Cluster, machines=MACHINES) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for name, step in (("speech", speech_step), ("image", image_step)):
        one = step(1, c)
        out[name] = [(P, one / step(P, c)) for P in machines]
    return out


def clusters(machine: Machine) -> list[Cluster]:
    """The two assumption sets docs/planner.md states."""
    return [
        Cluster("paper-era: 8 cores x 8 GFLOP/s, 1 Gbit/s, 100 us", 8, 8.0,
                Link(100e-6, 0.94 * 1e9 / 8)),
        Cluster(f"this machine's cores x 16 ({machine.gflops * machine.co_run:.0f} GFLOP/s "
                f"each), 10 Gbit/s, 25 us", 16, machine.gflops * machine.co_run,
                Link(25e-6, 0.94 * 1e10 / 8)),
    ]


def plot(out: Path, machine: Machine, data: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    titles = {"speech": "speech model (42M, fully connected)",
              "image": "locally connected image model (200x200x3)"}
    for ci, c in enumerate(clusters(machine)):
        cv = curves(c)
        for ax, name in zip(axes, ("speech", "image")):
            xs, ys = zip(*cv[name])
            ax.plot(xs, ys, marker="o", ms=3, ls="-" if ci == 0 else "--", label=c.name)
    for ax, name in zip(axes, ("speech", "image")):
        px, py = zip(*PAPER[name])
        ax.plot(px, py, "k*", ms=11, label="paper (published points)")
        ax.set_xscale("log")
        ax.set_xlabel("machines per model instance")
        ax.set_ylabel("speedup of one minibatch")
        ax.set_title(titles[name], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Figure 3 extrapolated by the dbmpi cost model (up to 625 x 16 = 10,000 cores)",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
