"""Run-directory outputs a person reads: ``summary.json`` and the learning-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DbmpiError
from .rundir import RunDir


def write_json(path: Path, obj: dict, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)


def plot_learning_curve(run_dir: Path) -> Path:
    """Test accuracy against wall time, and each replica's training loss against its step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = RunDir(run_dir).metrics()
    evals = [r for r in recs if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    key = "reconstruction" if evals and "reconstruction" in evals[0] else "accuracy"
    if evals:  # an autoencoder run has no accuracy: its test reconstruction term instead
        ax1.plot([r["wall_s"] for r in evals], [r[key] for r in evals], "o-")
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel(f"test {key}")
    if key == "reconstruction":
        ax1.set_yscale("log")
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


def run_label(run_dir: Path) -> str:
    """A legend entry in the paper's style, from the run's config.toml: ``Downpour SGD w/
    Adagrad [2]`` (algorithm, optimizer, [replicas])."""
    try:
        cfg = RunDir(run_dir).config
    except DbmpiError:  # not a run's config: the directory's name is label enough
        return run_dir.name
    algo, replicas, opt = cfg.algorithm, cfg.topology.replicas, cfg.optimizer.name
    if algo == "sandblaster":
        name = "Sandblaster L-BFGS"
    elif algo == "downpour" and replicas == 1:
        name = "SGD" if opt == "sgd" else f"SGD w/ {opt.capitalize()}"
    elif algo == "downpour":
        name = "Downpour SGD" + ("" if opt == "sgd" else f" w/ {opt.capitalize()}")
    else:
        name = algo
    return f"{name} [{replicas}]"


def plot_time_to_accuracy(run_dirs: list[Path], out: Path, metric: str = "accuracy",
                          target: float | None = None, title: str | None = None
                          ) -> tuple[Path, list[str]]:
    """The paper's Figure 4 for our runs: each run's test ``metric`` (from its ``eval``
    records, or ``eval_iterates.jsonl`` where ``python -m dbmpi eval --iterates`` wrote one)
    against wall time, one line per run, in one PNG. Returns the PNG path and one line of
    text per run (time to ``target``, best and last value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [run_label(d) for d in run_dirs]
    table = []
    for d, label in zip(run_dirs, labels):
        if labels.count(label) > 1:
            label = f"{label} {d.name}"
        evals = RunDir(d).eval_records()
        if not evals:
            raise DbmpiError(f"{d}/metrics.jsonl has no eval records: lower "
                             "downpour.eval_every_s and run it again")
        t = [r["wall_s"] for r in evals]
        v = [r[metric] for r in evals]
        ax.plot(t, v, "-", marker=".", label=label)
        best = max(v) if metric == "accuracy" else min(v)
        row = f"{label}: {metric} best {best:.4f}, last {v[-1]:.4f} at {t[-1]:.1f} s"
        if target is not None:
            hit = [ti for ti, vi in zip(t, v)
                   if (vi >= target if metric == "accuracy" else vi <= target)]
            row += (f"; reached {target:g} at {hit[0]:.1f} s" if hit
                    else f"; never reached {target:g}")
        table.append(row)
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, table
