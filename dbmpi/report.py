"""Run-directory outputs a person reads: ``summary.json`` and the learning-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from . import metrics as metrics_mod


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def plot_learning_curve(run_dir: Path) -> Path:
    """Test accuracy against wall time, and each replica's training loss against its step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = metrics_mod.read(run_dir)
    evals = [r for r in recs if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if evals:
        ax1.plot([r["wall_s"] for r in evals], [r["accuracy"] for r in evals], "o-")
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("coordinator evaluation")
    ax1.grid(alpha=0.3)
    replicas = sorted({r["replica"] for r in recs if r["kind"] == "train"})
    for rep in replicas:
        tr = [r for r in recs if r["kind"] == "train" and r["replica"] == rep]
        ax2.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=f"replica {rep}")
    ax2.set_xlabel("replica step")
    ax2.set_ylabel("training loss")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if replicas:
        ax2.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
