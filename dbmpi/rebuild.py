"""Rebuild the end-of-run outputs of a finished run that lost them.

A job that dies in its final writes (a full disk while merging metrics or writing
``summary.json``) has committed its final checkpoint already, so the same command used to say
"holds a finished run: nothing to do" and the summary was never written. Everything those
files hold is still on disk: the parameters in the final checkpoint's shard files, the test
evaluations in ``metrics/rank-*.jsonl``; :func:`rebuild_missing` writes them again.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_mod
from . import metrics as metrics_mod
from .log import get_logger
from .report import write_json

log = get_logger("rebuild")

OUTPUTS = ("params.h5", "metrics.jsonl", "summary.json", "learning_curve.png")


def missing_outputs(run_dir: Path, cfg) -> list[str]:
    return [name for name in OUTPUTS if not (run_dir / name).is_file()
            and (cfg.run.learning_curve or name != "learning_curve.png")]


def rebuild_missing(run_dir: Path, ck: ckpt_mod.Checkpoint, cfg) -> list[str]:
    """Write each missing output of finished run ``run_dir`` from its final checkpoint ``ck``
    and its per-rank metrics; return the names written. A write that fails raises
    :class:`~dbmpi.checkpoint.DiskWriteError`."""
    missing = missing_outputs(run_dir, cfg)
    done = []
    if "params.h5" in missing:
        params, _ = ck.load_block(0, ck.num_params)
        ckpt_mod.save_params(run_dir / "params.h5", params, ck.model, ck.steps)
        done.append("params.h5")
    if "metrics.jsonl" in missing:
        metrics_mod.merge(run_dir)
        done.append("metrics.jsonl")
    if "summary.json" in missing:
        with ckpt_mod.writing(run_dir / "summary.json", run_dir / "summary.json.tmp"):
            write_json(run_dir / "summary.json", summary_from(run_dir, ck, cfg))
        done.append("summary.json")
    if "learning_curve.png" in missing:
        from .report import plot_learning_curve

        try:
            with ckpt_mod.writing(run_dir / "learning_curve.png"):
                plot_learning_curve(run_dir)
            done.append("learning_curve.png")
        except ckpt_mod.DiskWriteError:
            raise
        except Exception as exc:  # no eval records, no matplotlib: the rest still stands
            log.warning("could not draw the learning curve: %s", exc)
    return done


def summary_from(run_dir: Path, ck: ckpt_mod.Checkpoint, cfg) -> dict:
    """summary.json's numbers as far as the checkpoint and the metrics hold them: the steps
    (each replica's from the checkpoint's worker rows) and the test evaluations; the timing
    of the lost run's ranks is not on disk and is left out (``rebuilt`` says so)."""
    evals = [r for r in metrics_mod.read(run_dir) if r.get("kind") == "eval"]
    evals.sort(key=lambda r: (r.get("step", 0), r.get("time", 0.0)))
    R, P = cfg.topology.replicas, cfg.topology.partitions
    each = [int(s) for s in ck.workers[::P, 0]] if cfg.algorithm == "downpour" else []
    out = {"steps": ck.steps, "replicas": R,
           **({"replica_steps": each} if each else {}),
           "final_test_loss": evals[-1]["loss"] if evals else None,
           "final_test_accuracy": evals[-1]["accuracy"] if evals else None,
           "best_test_accuracy": max((r["accuracy"] for r in evals), default=None),
           "wall_s": max((r.get("time", 0.0) for r in evals), default=None),
           "num_params": ck.num_params,
           "algorithm": cfg.algorithm,
           "topology": {"shards": cfg.topology.shards, "replicas": R, "partitions": P},
           "rebuilt": {"from_checkpoint": ck.sequence,
                       "note": "rebuilt after the run's own final write failed; per-rank "
                               "timing was not recorded"}}
    for key in ("reconstruction", "sparsity"):
        if evals and key in evals[-1]:
            out[f"final_test_{key}"] = evals[-1][key]
    return out
