"""Run whole dbmpi jobs from a benchmark: the launcher's command and environment, a throwaway
run directory, and the run's summary and metrics read back."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import ROOT

from dbmpi import config as config_mod
from dbmpi.launch import MPICH_YIELD, command, find_mpiexec, launch_env


def launch(cfg_path: str, overrides: list[str], run_dir: Path, yield_cpu: bool = True,
           timeout: float = 1800, threads: int | None = None) -> dict:
    """Run ``train`` into ``run_dir`` like ``python -m dbmpi launch``; return the run's
    ``summary`` (summary.json), ``records`` (metrics.jsonl), ``wall_s`` of the whole job and
    its ``stderr``.

    ``threads`` fixes the BLAS threads per rank (default: the launcher's choice);
    ``yield_cpu=False`` drops MPICH's yield settings (to measure what they save).
    """
    cfg = config_mod.load(cfg_path, overrides)
    n = cfg.topology.world_size
    base = {k: v for k, v in os.environ.items() if not k.startswith("MPIR_CVAR_")}
    if threads is not None:
        for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            base[key] = str(threads)
    env = launch_env(n, cfg.topology.replicas * cfg.topology.partitions, env=base)
    if not yield_cpu:
        for key in MPICH_YIELD:
            env.pop(key, None)
    cmd = command(cfg_path, [*overrides, f"run.dir={json.dumps(str(run_dir))}"], n,
                  find_mpiexec())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "metrics.jsonl").open() as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return {"summary": summary, "records": records,
            "wall_s": round(time.perf_counter() - t0, 1), "stderr": proc.stderr}


def run_job(cfg_path: str, overrides: list[str], yield_cpu: bool = True,
            timeout: float = 1800, threads: int | None = None,
            iterates: bool = False) -> tuple[dict, list[dict]]:
    """:func:`launch` into a throwaway run directory; return (summary, metrics records).

    ``iterates``: the run recorded its parameters (``record_iterates``); score them after it
    (``python -m dbmpi eval --iterates``) and return those ``eval`` records instead of its own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        job = launch(cfg_path, overrides, run_dir, yield_cpu, timeout, threads)
        records = job["records"]
        if iterates:
            from dbmpi.evaluate import evaluate_iterates

            with evaluate_iterates(run_dir).open() as fh:
                scored = [json.loads(line) for line in fh if line.strip()]
            records = [r for r in records if r["kind"] != "eval"] + scored
    return job["summary"], records
