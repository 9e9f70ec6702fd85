"""Metrics: one JSON-lines file per rank while the job runs, merged by the coordinator at the end.

Each rank appends to ``RUN_DIR/metrics/rank-NNNNN.jsonl`` (line-buffered, so a crashed job still
leaves its records); the coordinator merges them into ``RUN_DIR/metrics.jsonl`` ordered by time.
Record kinds: ``train`` (a replica's loss, accuracy and samples/s), ``push`` (staleness of each
acknowledged push, per shard), ``eval`` (the coordinator's test loss and accuracy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, rank: int, t0: float | None = None):
        self.dir = Path(run_dir) / "metrics"
        self.path = self.dir / f"rank-{rank:05d}.jsonl"
        self.fh = self.path.open("a", buffering=1)
        self.t0 = time.time() if t0 is None else t0

    def write(self, kind: str, **fields) -> None:
        rec = {"kind": kind, "time": round(time.time() - self.t0, 4), **fields}
        self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.fh.close()


def merge(run_dir: str | Path) -> Path:
    """Merge the per-rank files into ``metrics.jsonl`` (sorted by time); return its path."""
    run_dir = Path(run_dir)
    records = []
    for path in sorted((run_dir / "metrics").glob("rank-*.jsonl")):
        with path.open() as fh:
            for line in fh:
                line = line.strip()
                if line:
                    records.append(json.loads(line))
    records.sort(key=lambda r: r["time"])
    out = run_dir / "metrics.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    tmp.replace(out)
    return out


def read(run_dir: str | Path) -> list[dict]:
    with (Path(run_dir) / "metrics.jsonl").open() as fh:
        return [json.loads(line) for line in fh if line.strip()]
