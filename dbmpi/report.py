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


def fitted_limits(series: list[list[float]], target: float | None = None
                  ) -> tuple[float, float]:
    """Accuracy axis limits that show where the runs are, not the whole 0-1 range: from a bit
    below the lowest value after each run's first evaluation (the untrained start, near
    chance, would squeeze 0.87 -> 0.90 into a flat line) to just above the best."""
    shown = [v for s in series for v in (s[1:] if len(s) > 1 else s)]
    if target is not None:
        shown.append(target)
    lo, hi = min(shown), max(max(s) for s in series if s)
    hi = max(hi, lo)
    pad = max(0.08 * (hi - lo), 0.005)
    return max(0.0, lo - pad), hi + pad / 2


def _by_replica(recs: list[dict], kind: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in recs:
        if r["kind"] == kind:
            out.setdefault(r.get("replica", 0), []).append(r)
    return out


def _replica_mean(series: dict[int, list[dict]], key: str) -> tuple[list[float], list[float]]:
    """``key`` averaged over the replicas at each step count (time too): one line for a run.
    Keyed on the step, not the record's index, since replicas start apart (a warm start runs
    replica 0 alone first)."""
    at: dict[int, list[dict]] = {}
    for recs in series.values():
        for r in recs:
            at.setdefault(r["step"], []).append(r)
    steps = sorted(at)
    t = [sum(r["time"] for r in at[s]) / len(at[s]) for s in steps]
    y = [sum(r[key] for r in at[s]) / len(at[s]) for s in steps]
    return t, y


def learning_curve_figure(run_dirs: list[Path], metric: str = "accuracy",
                          target: float | None = None, title: str | None = None):
    """Three panels against one wall clock (shared x): test ``metric`` (accuracy on a fitted
    axis; an autoencoder's test reconstruction, log scale), test loss (solid) with training
    loss (dashed, the mean over replicas), and samples/s per replica (each replica for one
    run; their mean per run when several are overlaid). Returns ``(figure, table)``: one line
    of text per run (best and last value, time to ``target``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_l, ax_t) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    labels = [run_label(d) for d in run_dirs]
    single = len(run_dirs) == 1
    table, series, key = [], [], metric
    for i, (d, label) in enumerate(zip(run_dirs, labels)):
        color = f"C{i}"
        if labels.count(label) > 1:
            label = f"{label} {d.name}"
        rd = RunDir(d)
        evals = rd.eval_records()
        if not evals:
            raise DbmpiError(f"{d}/metrics.jsonl has no eval records: lower "
                             "downpour.eval_every_s and run it again")
        recs = rd.metrics() if rd.file("metrics.jsonl").is_file() else []
        if "reconstruction" in evals[0]:  # an autoencoder: no accuracy, its reconstruction
            key = "reconstruction"
        t = [r["wall_s"] for r in evals]
        v = [r[key] for r in evals]
        series.append(v)
        ax_m.plot(t, v, "-", marker=".", color=color, label=label)
        ax_l.plot(t, [r["loss"] for r in evals], "-", marker=".", color=color,
                  label=f"{label}: test" if not single else "test loss")
        train = _by_replica(recs, "train")
        if train:
            tt, tl = _replica_mean(train, "loss")
            mean = f" (mean of {len(train)} replicas)" if len(train) > 1 else ""
            ax_l.plot(tt, tl, "--", color=color, label=f"{label}: training{mean}" if not single
                      else f"training loss{mean}")
        else:  # Sandblaster: the full-batch training loss of each L-BFGS iteration
            lb = [r for r in recs if r["kind"] == "lbfgs"]
            if lb:
                ax_l.plot([r["time"] for r in lb], [r["loss"] for r in lb], "--", color=color,
                          label=f"{label}: training" if not single else "training loss")
        if single:
            for rep, tr in sorted(train.items()):
                ax_t.plot([r["time"] for r in tr], [r["samples_per_s"] for r in tr],
                          label=f"replica {rep}")
        elif train:
            tt, ts = _replica_mean(train, "samples_per_s")
            ax_t.plot(tt, ts, color=color, label=label)
        best = min(v) if key in ("loss", "reconstruction") else max(v)
        row = f"{label}: {key} best {best:.4f}, last {v[-1]:.4f} at {t[-1]:.1f} s"
        if target is not None:
            hit = [ti for ti, vi in zip(t, v) if (vi >= target if key == "accuracy"
                                                  else vi <= target)]
            row += (f"; reached {target:g} at {hit[0]:.1f} s" if hit
                    else f"; never reached {target:g}")
        table.append(row)
    if key == "accuracy":
        ax_m.set_ylim(*fitted_limits(series, target))
    else:
        ax_m.set_yscale("log")
    if target is not None:
        ax_m.axhline(target, color="gray", ls="--", lw=1)
    ax_m.set_ylabel(f"test {key}")
    ax_l.set_ylabel("loss")
    ax_l.set_yscale("log")
    ax_t.set_ylabel("samples/s per replica")
    ax_t.set_xlabel("wall time (s)")
    if not ax_t.lines:
        ax_t.text(0.5, 0.5, "no per-replica training records", ha="center",
                  transform=ax_t.transAxes)
    for ax in (ax_m, ax_l, ax_t):
        ax.grid(alpha=0.3)
        if ax.lines and (ax is not ax_m or not single):
            ax.legend(fontsize=8)
    fig.suptitle(title or (run_dirs[0].name if single else ""))
    fig.tight_layout()
    return fig, table


def plot_learning_curve(run_dir: Path) -> Path:
    """``RUN_DIR/learning_curve.png``: the run's :func:`learning_curve_figure`."""
    import matplotlib.pyplot as plt

    fig, _ = learning_curve_figure([run_dir])
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_time_to_accuracy(run_dirs: list[Path], out: Path, metric: str = "accuracy",
                          target: float | None = None, title: str | None = None
                          ) -> tuple[Path, list[str]]:
    """Several runs overlaid in one :func:`learning_curve_figure` (its first panel is the
    paper's Figure 4 for our runs: test ``metric`` against wall time, from each run's ``eval``
    records or the ``eval_iterates.jsonl`` that ``python -m dbmpi eval --iterates`` wrote).
    Returns the PNG path and one line of text per run (time to ``target``, best, last)."""
    import matplotlib.pyplot as plt

    fig, table = learning_curve_figure(run_dirs, metric, target, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, table
