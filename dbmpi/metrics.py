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

from .checkpoint import writing
from .log import get_logger

log = get_logger("metrics")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, rank: int, t0: float | None = None):
        self.dir = Path(run_dir) / "metrics"
        self.path = self.dir / f"rank-{rank:05d}.jsonl"
        with writing(self.path):
            self.fh = self.path.open("a", buffering=1)
        self.t0 = time.time() if t0 is None else t0

    def write(self, kind: str, **fields) -> None:
        rec = {"kind": kind, "time": round(time.time() - self.t0, 4), **fields}
        with writing(self.path):
            self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError as exc:  # the last buffered bytes did not fit: already torn, say so
            log.warning("%s: last records lost on close (%s)", self.path, exc)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file, skipping lines that do not parse (a full disk or a
    kill leaves a torn last line): they are counted and named in one warning, so a run that
    trained to its end is not lost to half a line of metrics."""
    path = Path(path)
    records, bad, first = [], 0, None
    with path.open(errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
                first = first or n
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON records (first: line %d; a torn "
                    "write from a full disk or a killed rank)", path, bad, first)
    return records


def merge(run_dir: str | Path) -> Path:
    """Merge the per-rank files into ``metrics.jsonl`` (sorted by time); return its path."""
    run_dir = Path(run_dir)
    records = []
    for path in sorted((run_dir / "metrics").glob("rank-*.jsonl")):
        records.extend(read_jsonl(path))
    records.sort(key=lambda r: float(r.get("time", 0.0)))
    out = run_dir / "metrics.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    with writing(out, tmp):
        with tmp.open("w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
        tmp.replace(out)
    return out


def read(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
