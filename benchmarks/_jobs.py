"""Run whole dbmpi jobs from a benchmark: the launcher's command and environment, a throwaway
run directory, and the run's summary and metrics read back."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from _common import ROOT

from dbmpi import config as config_mod
from dbmpi.launch import MPICH_YIELD, command, find_mpiexec, launch_env


def run_job(cfg_path: str, overrides: list[str], yield_cpu: bool = True,
            timeout: float = 1800, threads: int | None = None,
            iterates: bool = False) -> tuple[dict, list[dict]]:
    """Run ``train`` like ``python -m dbmpi launch``; return (summary, metrics records).

    ``threads`` fixes the BLAS threads per rank (default: the launcher's choice).
    ``iterates``: the run recorded its parameters (``record_iterates``); score them after it
    (``python -m dbmpi eval --iterates``) and return those ``eval`` records instead of its own.
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
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = command(cfg_path, [*overrides, f"run.dir={json.dumps(str(run_dir))}"], n,
                      find_mpiexec())
        proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        with (run_dir / "metrics.jsonl").open() as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        if iterates:
            from dbmpi.evaluate import evaluate_iterates

            with evaluate_iterates(run_dir).open() as fh:
                scored = [json.loads(line) for line in fh if line.strip()]
            records = [r for r in records if r["kind"] != "eval"] + scored
    return summary, records
